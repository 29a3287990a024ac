"""Sana pretraining from raw images encoded inside the step (config.encoders: the DC-AE and Gemma-2 run on the
devices), sized by a memory plan for an 8-GPU host or a 64-chip TPU slice. Used by sana_600m_online.py and
sana_1600m_online.py; arguments: res=512|1024, target=gpu8|tpu64, steps=N, runlocal.

  python train.py --config configs/sana_600m_online.py:res=512,target=gpu8 --workdir DIR \\
      --config.encoders=/models/Sana_600M_512px_diffusers --config.data.source=folder:/data/images
  python -m sana_jax.training.plan --config configs/sana_600m_online.py:res=512,target=gpu8 --devices 8 --target h100

Every device holds a shard of each weight (fsdp over all of them: data=1, fsdp=-1), the encoders' included. The
batch is the largest the plan allows (`--max-batch`, XLA:CPU on simulated devices, 10% of HBM kept free) on the
smallest device of the family, rounded down to a multiple of 4 per device where it allows 4 or more: an H100 80 GB
for gpu8 (so an H200 too; set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, JAX takes 75% of a GPU by default) and a TPU
v5e 16 GB for tpu64 (so v5p and v6e too). On 64 chips the text encoder's activations dominate (docs/benchmarks.md).
A bigger global batch: config.grad_accum (it splits the DiT's work only: the encoders see the whole batch at once);
another mesh or device: plan it again.
"""
import ml_collections as mlc

from configs import common, dcae

TARGETS = {"gpu8": ("h100", 8), "tpu64": ("v5e", 64)}  # the plan's target device and the device count
# (size, res, target) -> (batch per device, remat). python -m sana_jax.training.plan ... --max-batch found 76, 21, 51,
# 14 per H100 with remat "dots"; per v5e chip 14 and 9 at 512 px with "dots", 8 and 6 at 1024 px with "full"
# (with Gemma-2's activations split over the batch; docs/benchmarks.md)
PLANNED = {
    ("600m", 512, "gpu8"): (76, "dots"),
    ("600m", 1024, "gpu8"): (20, "dots"),
    ("1600m", 512, "gpu8"): (48, "dots"),
    ("1600m", 1024, "gpu8"): (12, "dots"),
    ("600m", 512, "tpu64"): (12, "dots"),
    ("600m", 1024, "tpu64"): (8, "full"),
    ("1600m", 512, "tpu64"): (8, "dots"),
    ("1600m", 1024, "tpu64"): (4, "full"),
}


def released_encoders():
  """The released encoders' architectures, for planning without their weights: DC-AE f32c32-sana and Gemma-2 2B
  (transformers' config names), whose tokenizer cuts Sana's complex human instruction into 205 tokens
  (bench/text_encoder.py), and the 300 caption tokens the DiT sees."""
  return mlc.ConfigDict(dict(
      vae=dcae.get_config("name=f32c32-sana").model.to_dict(),
      text_encoder=dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256),
      chi_tokens=205, max_sequence_length=300))


def small_encoders():
  """A 4x DC-AE and a 2-layer Gemma-2 of width 64 (the runlocal DiT's caption width): a plan in seconds."""
  return mlc.ConfigDict(dict(
      vae=dict(in_channels=3, latent_channels=32, attention_head_dim=8, scaling_factor=0.5,
               encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
               encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
               encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
               downsample_block_type="conv", upsample_block_type="interpolate"),
      text_encoder=dict(model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        query_pre_attn_scalar=32),
      chi_tokens=0, max_sequence_length=16))


def online_config(size, arg):
  arg = common.parse_arg(arg, res=1024, target="gpu8", steps=200_000, runlocal=False)
  if arg.target not in TARGETS:
    raise ValueError(f"target={arg.target!r}: expected one of {sorted(TARGETS)}")
  if (size, arg.res, arg.target) not in PLANNED:
    raise ValueError(f"res={arg.res}: planned for 512 and 1024 px")
  per_device, remat = PLANNED[size, arg.res, arg.target]
  devices = TARGETS[arg.target][1]
  c = common.sana_config(size, f"res={arg.res},steps={arg.steps},remat={remat},batch={per_device * devices}")
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.encoders = f"/path/to/Sana_{size.upper()}_{arg.res}px_diffusers"  # set: a diffusers-format Sana directory
  c.plan_encoders = released_encoders()  # what sana_jax.training.plan compiles while encoders is not a directory
  c.data.update(source="folder:/path/to/images", spatial_compression=common.VAE_DOWNSAMPLE)  # or tfds:NAME
  if arg.runlocal:  # the same step, small: the plan runs in seconds on a laptop's CPU
    common.shrink_for_runlocal(c.model)
    c.dtype, c.batch_size, c.optim.base_batch = "float32", 8, 8
    c.plan_encoders = small_encoders()
    c.data.update(latent_size=4, spatial_compression=4, caption_length=16, caption_channels=64, num_workers=0)
  return c
