"""Shared pieces of the configs: argument parsing and the released Sana model shapes.

Model fields use diffusers' SanaTransformer2DModel names, so a config's `model` block and a
checkpoint's config.json describe the same thing.
"""
import ml_collections as mlc
from ml_collections.config_dict import placeholder

# Width, depth and cross-attention heads of the released checkpoints (diffusers' conversion script).
SIZES = {
    "600m": dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16, cross_attention_head_dim=72),
    "1600m": dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112),
    "4800m": dict(num_attention_heads=70, num_layers=60, num_cross_attention_heads=20, cross_attention_head_dim=112),
}
RESOLUTIONS = (512, 1024, 2048, 4096)
# 512/1024 checkpoints use no positional embedding; 2K/4K add 2D sin-cos with this interpolation scale.
INTERPOLATION_SCALE = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}
VAE_DOWNSAMPLE = 32  # DC-AE f32c32


def parse_arg(arg, **defaults):
  """big_vision-style "res=1024,runlocal" -> ConfigDict; a bare name means True; types follow defaults."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not _:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def sana_transformer(size, res, *, qk_norm=False, guidance_embeds=False):
  """ConfigDict of SanaTransformer fields for a released size at an image resolution (pixels)."""
  if size not in SIZES:
    raise ValueError(f"unknown Sana size {size!r}; known: {sorted(SIZES)}")
  if res not in RESOLUTIONS:
    raise ValueError(f"resolution {res} is not one of the released {RESOLUTIONS}")
  s = SIZES[size]
  width = s["num_attention_heads"] * 32
  scale = INTERPOLATION_SCALE[res]
  return mlc.ConfigDict(dict(
      in_channels=32, out_channels=32, attention_head_dim=32, cross_attention_dim=width,
      caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=res // VAE_DOWNSAMPLE,
      patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
      interpolation_scale=placeholder(float) if scale is None else scale,
      qk_norm=placeholder(str) if not qk_norm else "rms_norm_across_heads",
      guidance_embeds=guidance_embeds, guidance_embeds_scale=0.1, timestep_scale=1.0,
      linear_attention_eps=1e-15, remat="none", scan_unroll=2, **s))


def shrink_for_runlocal(model):
  """Same code path, laptop-sized: 2 layers, 2 heads, small text width."""
  model.num_attention_heads, model.num_layers = 2, 2
  model.num_cross_attention_heads, model.cross_attention_head_dim = 2, 32
  model.cross_attention_dim, model.caption_channels = 64, 64
  return model


def sana_config(size, arg, **variant):
  """The full config shared by the per-size files: the model and a training run. (Sampling settings
  live with the released pipelines: their scheduler_config.json, read by sample.py.)

  Pretraining follows the paper's recipe (CAME lr 1e-4, clip 0.1, logit-normal timesteps); `init_from`
  (a diffusers transformer directory) turns it into fine-tuning at a lower learning rate.
  """
  arg = parse_arg(arg, res=1024, runlocal=False, dtype="bfloat16", remat="none", batch=1024, steps=200_000,
                  init_from="")
  c = mlc.ConfigDict()
  c.model = sana_transformer(size, arg.res, **variant)
  c.model.remat = arg.remat
  c.dtype = arg.dtype
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = {}  # overrides of sana_jax.parallel.DEFAULT_RULES: {logical name: mesh axis}
  # precomputed latents + Gemma embeddings (python -m sana_jax.data.precompute); set data.source
  data = dict(source="", latent_channels=32, latent_size=arg.res // VAE_DOWNSAMPLE, caption_length=300,
              caption_channels=2304, num_workers=8)
  finetune = bool(arg.init_from)
  training(c, batch_size=arg.batch, total_steps=arg.steps, lr=2e-5 if finetune else 1e-4,
           warmup_steps=500 if finetune else 2000, data=data, init_from=arg.init_from)
  c.objective.flow_shift = 3.0  # the released training configs (512 and 1024 px alike)
  c.mesh.fsdp = 1 if size == "600m" else -1  # 1.6B and up: shard weights and optimizer state (ZeRO-3)
  c.mesh.data = -1 if size == "600m" else 1
  if arg.runlocal:
    shrink_for_runlocal(c.model)
    c.dtype = "float32"
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 10, 1, 5
    c.data = dict(source="synthetic", latent_channels=32, latent_size=4, caption_length=8,
                  caption_channels=c.model.caption_channels, num_workers=0)
    c.optim.base_batch = 8
  return c


def training(c, *, batch_size, total_steps, lr, warmup_steps, data, init_from=""):
  """The training blocks shared by every run config (diffusers' / the paper's recipe by default)."""
  c.seed = 0
  c.batch_size = batch_size           # global, over all processes
  c.grad_accum = 1
  c.total_steps = total_steps
  c.log_every = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.max_nonfinite_steps = 20          # non-finite steps in a row before the run stops
  c.ema_decay = 0.0                   # 0 keeps no EMA
  c.attention_impl = "xla"
  c.init_from = init_from             # a diffusers transformer directory to fine-tune from
  c.encoders = ""                     # a diffusers pipeline directory: encode folder:/tfds: images online
  # LoRA fine-tuning of init_from when rank > 0 (sana_jax.training.adapters); alpha None: alpha = rank
  c.lora = dict(rank=0, alpha=placeholder(float), targets=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0)
  # a ControlNet steering the frozen init_from when num_layers > 0 (sana_jax.training.controlnet)
  c.controlnet = dict(num_layers=0, conditioning_scale=1.0)
  c.objective = dict(weighting="logit_normal", logit_mean=0.0, logit_std=1.0, flow_shift=1.0,
                     integer_timesteps=False, caption_dropout=0.1)
  c.optim = dict(name="came", lr=lr, lr_scaling=placeholder(str), base_batch=batch_size, warmup_steps=warmup_steps,
                 schedule="constant", b1=0.9, b2=0.999, b3=0.9999, eps=None, clip_threshold=1.0,
                 weight_decay=0.0, clip_norm=0.1, end_lr_factor=0.0)
  c.data = data
  c.eval = dict(every=0, sigmas=(0.25, 0.5, 0.75), batches=2)
  c.sample = dict(every=0, model_dir="", prompts=("a photo of a cat",), steps=20, guidance_scale=4.5, seed=0)
  return c
