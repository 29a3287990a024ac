"""DCAE vs diffusers' AutoencoderDC on tiny random models shifted off init, non-square images."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sana_jax
from reference import nchw_to_nhwc, nhwc_to_nchw, rel_err, shift_off_init

CONFIGS = {
    # ResBlock + EfficientViT with multi-scale q/k/v, pixel (un)shuffle, RMSNorm everywhere
    "unshuffle_multiscale_rms": dict(
        in_channels=3, latent_channels=8, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 2),
        encoder_qkv_multiscales=((), (3,), (3, 5)), decoder_qkv_multiscales=((), (3,), (5,)),
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5),
    # the released f32c32 layout in small: strided-conv down, interpolate up, batch-norm + ReLU
    # decoder stages, no first-stage blocks (conv_in / conv_out do the resampling), and a last
    # stage small enough (3x5 <= head dim 16) that diffusers takes its quadratic attention branch
    "conv_interpolate_batchnorm": dict(
        in_channels=3, latent_channels=8, attention_head_dim=16,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 2, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"), decoder_act_fns=("relu", "relu", "silu"),
        scaling_factor=0.41407),
}


def make_reference(tmp_path, config, seed=0):
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderDC(**config).eval()
  shift_off_init(ref, seed=seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():  # batch-norm statistics are buffers, not parameters: move them too
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
  ref.save_pretrained(tmp_path)
  return ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_decode_match_diffusers(tmp_path, name):
  ref = make_reference(tmp_path, CONFIGS[name])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  assert ours.scaling_factor == CONFIGS[name]["scaling_factor"]
  rng = np.random.default_rng(0)
  images = np.tanh(rng.standard_normal((2, 12, 20, 3))).astype(np.float32)  # non-square, in [-1, 1]
  with torch.no_grad():
    ref_latents = nchw_to_nhwc(ref.encode(nhwc_to_nchw(images)).latent)
  latents = np.asarray(ours.encode(jnp.asarray(images)))
  assert latents.shape == (2, 3, 5, 8) == ref_latents.shape
  assert rel_err(latents, ref_latents) <= 1e-4

  z = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  with torch.no_grad():
    ref_images = nchw_to_nhwc(ref.decode(nhwc_to_nchw(z)).sample)
  decoded = np.asarray(ours.decode(jnp.asarray(z)))
  assert decoded.shape == (2, 12, 20, 3)
  assert rel_err(decoded, ref_images) <= 1e-4


def test_bad_image_shape_is_a_user_error(tmp_path):
  make_reference(tmp_path, CONFIGS["conv_interpolate_batchnorm"])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  with pytest.raises(sana_jax.SanaError, match="multiples of 4"):
    ours.encode(jnp.zeros((1, 10, 12, 3)))
