"""The shipped demo model: a small Sana DiT on the synthetic shapes dataset (64x64 px, 8x8 latents).

  python train.py --config configs/demo_shapes.py:latents=DIR --workdir /tmp/shapes-dit

DIR holds the precomputed latents and text embeddings (`python -m sana_jax.demo.recipe` writes it
and runs this; see README "The demo model"). Sized to train on a 2-core CPU in well under an hour.
`pe` adds the sin-cos position embedding (diffusers' interpolation_scale=1.0): without it only the
Mix-FFN convolutions' zero padding tells the DiT where a token is. `init_from=DIR` fine-tunes a
diffusers transformer directory. The shipped DiT is `layers=8,pe`.
"""
import ml_collections as mlc

from configs import common


def get_config(arg=""):
  arg = common.parse_arg(arg, latents="", channels=16, text_width=64, steps=3000, batch=64, width_heads=4,
                         layers=6, pe=False, init_from="", lr=5e-4)
  c = mlc.ConfigDict()
  c.model = common.sana_transformer("600m", 512)
  c.model.update(num_attention_heads=arg.width_heads, num_layers=arg.layers, num_cross_attention_heads=arg.width_heads,
                 cross_attention_head_dim=32, cross_attention_dim=32 * arg.width_heads, caption_channels=arg.text_width,
                 in_channels=arg.channels, out_channels=arg.channels, sample_size=8,
                 interpolation_scale=1.0 if arg.pe else None)
  c.dtype = "float32"
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = {}
  data = dict(source=f"array_record:{arg.latents}", latent_size=8, latent_channels=arg.channels,
              caption_length=16, caption_channels=arg.text_width, spatial_compression=8, num_workers=0)
  common.training(c, batch_size=arg.batch, total_steps=arg.steps, lr=arg.lr, warmup_steps=min(200, arg.steps // 10),
                  data=data, init_from=arg.init_from)
  c.optim.update(name="adamw", b3=0.9999, clip_norm=1.0, schedule="cosine", end_lr_factor=0.1)
  c.objective.flow_shift = 1.0
  c.ema_decay = 0.999
  c.log_every = 50
  c.checkpoint_every = 500
  c.eval.update(every=500, batches=2)
  return c
