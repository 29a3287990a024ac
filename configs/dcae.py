"""The released DC-AE autoencoders (diffusers' AutoencoderDC configs).

  from configs import dcae; c = dcae.get_config("name=f32c32-sana")   # Sana 1.0 / 1.1
  names: f32c32-sana, f32c32-in, f32c32-mix, f64c128-in, f64c128-mix, f128c512-in, f128c512-mix
"""
import ml_collections as mlc

from configs import common

_SANA = dict(  # dc-ae-f32c32-sana-1.0 (also used by Sana 1.5)
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


def _in_mix(stages, scaling_factor):
  """The ImageNet ("in") and mixed-data ("mix") family: 32x, 64x or 128x compression."""
  chans = (128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages]
  vit = ("EfficientViTBlock",) * (stages - 3)
  return dict(
      encoder_block_types=("ResBlock",) * 3 + vit, decoder_block_types=("ResBlock",) * 3 + vit,
      encoder_block_out_channels=chans, decoder_block_out_channels=chans,
      encoder_layers_per_block=(0, 4, 8) + (2,) * (stages - 3),
      decoder_layers_per_block=(0, 5, 10) + (2,) * (stages - 3),
      encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
      downsample_block_type="conv", upsample_block_type="interpolate",
      decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
      decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3), scaling_factor=scaling_factor)


MODELS = {
    "f32c32-sana": dict(_SANA, latent_channels=32),
    "f32c32-in": dict(_in_mix(6, 0.3189), latent_channels=32),
    "f32c32-mix": dict(_in_mix(6, 0.4552), latent_channels=32),
    "f64c128-in": dict(_in_mix(7, 0.2889), latent_channels=128),
    "f64c128-mix": dict(_in_mix(7, 0.4538), latent_channels=128),
    "f128c512-in": dict(_in_mix(8, 0.4883), latent_channels=512),
    "f128c512-mix": dict(_in_mix(8, 0.3620), latent_channels=512),
}


def get_config(arg=""):
  arg = common.parse_arg(arg, name="f32c32-sana", dtype="bfloat16")
  if arg.name not in MODELS:
    raise ValueError(f"unknown DC-AE {arg.name!r}; known: {sorted(MODELS)}")
  c = mlc.ConfigDict()
  c.model = dict(in_channels=3, attention_head_dim=32, encoder_out_shortcut=True, decoder_in_shortcut=True,
                 decoder_conv_act_fn="relu", **MODELS[arg.name])
  c.dtype = arg.dtype
  return c
