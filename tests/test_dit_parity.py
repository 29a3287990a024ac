"""SanaTransformer vs diffusers' SanaTransformer2DModel on tiny random models shifted off init."""
import json

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from reference import nchw_to_nhwc, nhwc_to_nchw, rel_err, shift_off_init

import sana_jax

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=3, attention_head_dim=32, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=24, cross_attention_dim=96,
            caption_channels=40, mlp_ratio=2.5, sample_size=8)

FEATURES = {
    "patch1_nope": dict(),
    "patch2_sincos": dict(patch_size=2, interpolation_scale=2.0, sample_size=12),
    "qknorm_bias_affine": dict(qk_norm="rms_norm_across_heads", attention_bias=True, norm_elementwise_affine=True),
    "sprint_guidance_tscale": dict(guidance_embeds=True, guidance_embeds_scale=0.1, timestep_scale=1000.0,
                                   qk_norm="rms_norm_across_heads"),
}


def make_reference(tmp_path, seed=0, **overrides):
  torch.manual_seed(seed)
  ref = diffusers.SanaTransformer2DModel(**{**TINY, **overrides}).eval()
  shift_off_init(ref, seed=seed)
  ref.save_pretrained(tmp_path)
  return ref


def odd_inputs(cfg, batch=2, h=6, w=10, text_len=7, seed=0):
  """Non-square latents, padded text masks (different per row), non-integer timesteps."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cfg["in_channels"])).astype(np.float32)
  t = np.array([0.37, 0.912][:batch] + [0.5] * max(0, batch - 2), np.float32)
  y = rng.standard_normal((batch, text_len, cfg["caption_channels"])).astype(np.float32)
  mask = np.ones((batch, text_len), np.float32)
  mask[0, 4:] = 0
  if batch > 1:
    mask[1, 6:] = 0
  return x, t, y, mask


def reference_forward(ref, x, t, y, mask, guidance=None):
  cfg = ref.config
  kw = {}
  if guidance is not None:
    kw["guidance"] = torch.from_numpy(guidance * cfg.guidance_embeds_scale)
  with torch.no_grad():
    out = ref(nhwc_to_nchw(x), encoder_hidden_states=torch.from_numpy(y),
              timestep=torch.from_numpy(t * cfg.timestep_scale), encoder_attention_mask=torch.from_numpy(mask),
              **kw).sample
  return nchw_to_nhwc(out)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_matches_diffusers_float32(tmp_path, feature):
  overrides = FEATURES[feature]
  ref = make_reference(tmp_path, **overrides)
  cfg = {**TINY, **overrides}
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path, dtype=jnp.float32)
  h, w = (6, 10) if cfg.get("patch_size", 1) == 2 else (5, 7)
  x, t, y, mask = odd_inputs(cfg, h=h, w=w)
  g = np.array([4.5, 3.0], np.float32) if cfg.get("guidance_embeds") else None
  expected = reference_forward(ref, x, t, y, mask, guidance=g)
  got = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask), guidance=g))
  assert got.shape == expected.shape == x.shape
  assert rel_err(got, expected) <= 1e-4


def test_masked_text_positions_do_not_matter(tmp_path):
  """Padding tokens carry no information: changing them leaves the output unchanged."""
  make_reference(tmp_path)
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path)
  x, t, y, mask = odd_inputs(TINY)
  y2 = y.copy()
  y2[mask == 0] = 123.0
  a = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask))
  b = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y2), jnp.asarray(mask))
  assert rel_err(a, b) <= 1e-6
  y3 = y.copy()
  y3[0, 0] += 1.0  # a real token does matter
  c = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y3), jnp.asarray(mask))
  assert rel_err(c, a) > 1e-3


def test_bfloat16_close_to_float32(tmp_path):
  ref = make_reference(tmp_path, qk_norm="rms_norm_across_heads")
  x, t, y, mask = odd_inputs(TINY, h=5, w=7)
  expected = reference_forward(ref, x, t, y, mask)
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert ours.blocks.attn1.to_q.kernel[...].dtype == jnp.bfloat16
  got = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask))
  assert got.dtype == jnp.bfloat16
  assert rel_err(np.asarray(got.astype(jnp.float32)), expected) <= 2e-2


def test_sharded_checkpoint_loads(tmp_path):
  """A checkpoint split into several safetensors files with an index loads the same weights."""
  ref = make_reference(tmp_path / "single")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
  a = sana_jax.SanaTransformer.from_pretrained(tmp_path / "single")
  b = sana_jax.SanaTransformer.from_pretrained(tmp_path / "sharded")
  x, t, y, mask = odd_inputs(TINY)
  np.testing.assert_array_equal(np.asarray(a(x, t, y, mask)), np.asarray(b(x, t, y, mask)))


BAD_CHECKPOINTS = {  # edit of the state dict -> the error must name the offending key or parameter
    "unknown key": (lambda sd: sd.__setitem__("transformer_blocks.0.attn1.to_x.weight", torch.zeros(2)),
                    r"transformer_blocks\.0\.attn1\.to_x\.weight"),
    "missing key": (lambda sd: sd.pop("transformer_blocks.1.ff.conv_point.weight"),
                    r"ff\.conv_point\.kernel.*layer\(s\) \[1\]"),
    "wrong shape": (lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(5)), r"proj_out\.bias"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_error_names_the_key(tmp_path, case):
  edit, pattern = BAD_CHECKPOINTS[case]
  make_reference(tmp_path)
  f = tmp_path / "diffusion_pytorch_model.safetensors"
  sd = safetensors.torch.load_file(f)
  edit(sd)
  safetensors.torch.save_file(sd, f)
  with pytest.raises(sana_jax.SanaError, match=pattern):
    sana_jax.SanaTransformer.from_pretrained(tmp_path)


def test_unknown_config_key_is_named(tmp_path):
  make_reference(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["num_flux_capacitors"] = 3
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(sana_jax.SanaError, match="num_flux_capacitors"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path)


def test_missing_directory_is_a_user_error(tmp_path):
  with pytest.raises(sana_jax.SanaError, match="does not exist"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path / "nope")
