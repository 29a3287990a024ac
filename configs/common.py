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


def flow_shift(res):
  """Sampling shift of the released schedulers: 6.0 at 4K, 3.0 otherwise (diffusers' conversion)."""
  return 6.0 if res == 4096 else 3.0


def sana_config(size, arg, **variant):
  """The full config shared by the per-size files."""
  arg = parse_arg(arg, res=1024, runlocal=False, dtype="bfloat16", remat="none")
  c = mlc.ConfigDict()
  c.model = sana_transformer(size, arg.res, **variant)
  c.model.remat = arg.remat
  c.dtype = arg.dtype
  c.resolution = arg.res
  c.latent_size = arg.res // VAE_DOWNSAMPLE
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = {}  # overrides of sana_jax.parallel.DEFAULT_RULES: {logical name: mesh axis}
  c.sampling = dict(steps=20, guidance_scale=4.5, flow_shift=flow_shift(arg.res))
  if arg.runlocal:
    shrink_for_runlocal(c.model)
    c.dtype = "float32"
  return c
