"""DCAE vs diffusers' AutoencoderDC on tiny random models shifted off init, non-square images."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import nchw_to_nhwc, nhwc_to_nchw, rel_err, shift_off_init

import sana_jax

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


def smooth_field(shape, seed=0):
  """Low-frequency sinusoids: a smooth image or latent on which tile seams would show."""
  b, h, w, c = shape
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  phase = rng.uniform(0, 2 * np.pi, (b, 1, 1, c))
  return (np.sin(2 * np.pi * (0.7 * yy + 0.4 * xx)[None, ..., None] + phase) * 0.8).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiled_decode_and_encode_match_diffusers(tmp_path, name):
  """Same tiles, same blending as diffusers' tiled_decode / tiled_encode (16 and 24 tiles here)."""
  ref = make_reference(tmp_path, CONFIGS[name])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                    tile_sample_stride_width=24)
  z = smooth_field((1, 24, 40, 8))
  with torch.no_grad():
    expected = nchw_to_nhwc(ref.tiled_decode(nhwc_to_nchw(z), return_dict=False)[0])
  got = np.asarray(ours.tiled_decode(jnp.asarray(z), tile=32, stride=24))
  assert got.shape == expected.shape == (1, 96, 160, 3)
  assert rel_err(got, expected) <= 1e-4

  images = smooth_field((1, 48, 80, 3), seed=1)
  with torch.no_grad():
    expected = nchw_to_nhwc(ref.tiled_encode(nhwc_to_nchw(images), return_dict=False)[0])
  got = np.asarray(ours.tiled_encode(jnp.asarray(images), tile=32, stride=24))
  assert got.shape == expected.shape == (1, 12, 20, 8)
  assert rel_err(got, expected) <= 1e-4


def test_tiling_exact_for_one_tile_and_blending_helps(tmp_path):
  make_reference(tmp_path, CONFIGS["conv_interpolate_batchnorm"])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  z = jnp.asarray(smooth_field((1, 24, 40, 8)))
  full = np.asarray(ours._pure("decode")(z))  # the jitted untiled decode, as tiled_decode runs it
  assert rel_err(full, ours.decode(z)) < 1e-6
  np.testing.assert_array_equal(np.asarray(ours.tiled_decode(z, tile=160, stride=128)), full)  # one tile
  # a tiny random decoder sees far past a 64 px tile (and its attention is global), so tiles differ
  # from the whole; blending the overlap still brings the result closer than butting tiles together
  blended = rel_err(np.asarray(ours.tiled_decode(z, tile=64, stride=48)), full)
  butted = rel_err(np.asarray(ours.tiled_decode(z, tile=48, stride=48)), full)
  assert 0 < blended < butted
  with pytest.raises(sana_jax.SanaError, match="stride"):
    ours.tiled_decode(z, tile=32, stride=40)


def test_tiled_decode_bounds_memory(tmp_path):
  """Tiling caps scratch memory at one tile's: what lets a 4096 px decode fit where the whole does not."""
  import jax
  from flax import nnx
  make_reference(tmp_path, CONFIGS["conv_interpolate_batchnorm"])
  graphdef, state = nnx.split(sana_jax.DCAE.from_pretrained(tmp_path))
  decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))
  scratch = lambda n: decode.lower(state, jnp.zeros((1, n, n, 8))).compile().memory_analysis().temp_size_in_bytes
  whole, tile = scratch(256), scratch(32)  # a 1024 px image vs the 128 px tiles tiled_decode would run
  assert tile * 16 < whole


@pytest.mark.skipif(len(__import__("jax").devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_decode_split_along_height_equals_single_device(tmp_path):
  from sana_jax import parallel
  make_reference(tmp_path, CONFIGS["unshuffle_multiscale_rms"])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 6, 8)).astype(np.float32))
  mesh = parallel.make_mesh(data=-1, fsdp=1, tensor=1)  # 8 devices along height: 2 latent rows each
  got = ours.sharded_decode(z, mesh)
  assert got.sharding.spec[1] is not None and len(got.addressable_shards) == 8
  assert got.addressable_shards[0].data.shape == (1, 64 // 8, 24, 3)
  assert rel_err(np.asarray(got), np.asarray(ours.decode(z))) <= 1e-5
  with pytest.raises(sana_jax.SanaError, match="divisible"):
    ours.sharded_decode(z[:, :15], mesh)


@pytest.mark.skipif(len(__import__("jax").devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_height_split_decode_needs_less_memory_per_device(tmp_path):
  """The activations really are split: per-device scratch close to 1/8 of the single-device one. (Left to the
  partitioner, row-split convolutions keep several halo-padded copies of each block: 0.38 of it.)"""
  import jax
  from flax import nnx

  from sana_jax import parallel
  from sana_jax.models import dcae
  make_reference(tmp_path, CONFIGS["unshuffle_multiscale_rms"])
  graphdef, state = nnx.split(sana_jax.DCAE.from_pretrained(tmp_path))
  z = jnp.zeros((1, 128, 64, 8))
  single = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z)).lower(state, z).compile()
  mesh = parallel.make_mesh()
  replicated = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  split = dcae._decode_split.lower(graphdef, mesh, replicated, jax.device_put(z, parallel.spatial_sharding(mesh)))
  per_device = split.compile().memory_analysis().temp_size_in_bytes
  assert per_device * 8 < 1.5 * single.memory_analysis().temp_size_in_bytes  # measured: 1.04


def test_repeated_tiled_decode_compiles_once(tmp_path):
  """Calling tiled_decode again reuses the compiled tile programs instead of recompiling them."""
  from sana_jax.models import dcae
  make_reference(tmp_path, CONFIGS["conv_interpolate_batchnorm"])
  ours = sana_jax.DCAE.from_pretrained(tmp_path)
  z = jnp.asarray(smooth_field((1, 24, 40, 8)))
  first = ours.tiled_decode(z, tile=64, stride=48)
  compiled = dcae._apply_method._cache_size()
  np.testing.assert_array_equal(np.asarray(ours.tiled_decode(z, tile=64, stride=48)), np.asarray(first))
  assert dcae._apply_method._cache_size() == compiled
