"""SanaControlNetModel and the transformer's residual inputs vs diffusers' SanaControlNetModel /
SanaTransformer2DModel(controlnet_block_samples=...), on tiny random models shifted off init (the
zero-initialised input and output projections included)."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import nhwc_to_nchw, rel_err, shift_off_init
from test_dit_parity import odd_inputs

import sana_jax
from sana_jax.models.controlnet import SanaControlNetModel

DIMS = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_cross_attention_heads=2,
            cross_attention_head_dim=24, cross_attention_dim=64, caption_channels=40)
VARIANTS = {"nope": dict(sample_size=16), "sincos": dict(sample_size=8, interpolation_scale=1.0)}


def make_pair(tmp_path, **overrides):
  torch.manual_seed(0)
  base = shift_off_init(diffusers.SanaTransformer2DModel(**DIMS, num_layers=4, **overrides).eval(), seed=0)
  control = shift_off_init(diffusers.SanaControlNetModel(**DIMS, num_layers=2, **overrides).eval(), seed=1)
  base.save_pretrained(tmp_path / "transformer")
  control.save_pretrained(tmp_path / "controlnet")
  return base, control


def run_reference(base, control, x, t, y, mask, cond, scale):
  kw = dict(encoder_hidden_states=torch.from_numpy(y), encoder_attention_mask=torch.from_numpy(mask),
            timestep=torch.from_numpy(t))
  with torch.no_grad():
    samples = control(nhwc_to_nchw(x), controlnet_cond=nhwc_to_nchw(cond), conditioning_scale=scale, **kw)[0]
    out = base(nhwc_to_nchw(x), controlnet_block_samples=tuple(samples), **kw).sample
  return np.stack([s.numpy() for s in samples]), out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_controlnet_matches_diffusers_float32(tmp_path, variant):
  base, control = make_pair(tmp_path, **VARIANTS[variant])
  x, t, y, mask = odd_inputs(DIMS, h=5, w=7)
  cond = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  want_samples, want = run_reference(base, control, x, t, y, mask, cond, 0.7)

  ours_base = sana_jax.SanaTransformer.from_pretrained(tmp_path / "transformer")
  ours_control = SanaControlNetModel.from_pretrained(tmp_path / "controlnet")
  args = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask)
  samples = ours_control(*args, controlnet_cond=jnp.asarray(cond), conditioning_scale=0.7)
  assert samples.shape == (2, 2, 35, 64)
  assert rel_err(samples, want_samples) < 1e-4
  assert rel_err(ours_base(*args, controlnet_block_samples=samples), want) < 1e-4
  # scale 0: the base model's own output
  off = ours_control(*args, controlnet_cond=jnp.asarray(cond), conditioning_scale=0.0)
  np.testing.assert_allclose(ours_base(*args, controlnet_block_samples=off), ours_base(*args), atol=1e-6)


def test_export_loads_in_diffusers_with_equal_outputs(tmp_path):
  _, control = make_pair(tmp_path, sample_size=16)
  ours = SanaControlNetModel.from_pretrained(tmp_path / "controlnet")
  ours.save_pretrained(tmp_path / "exported")
  loaded = diffusers.SanaControlNetModel.from_pretrained(tmp_path / "exported").eval()
  public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
  assert public(loaded.config) == public(control.config)
  for name, w in control.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), w.numpy(), err_msg=name)


def test_bad_residuals_and_conditions_are_errors(tmp_path):
  make_pair(tmp_path, sample_size=16)
  ours_base = sana_jax.SanaTransformer.from_pretrained(tmp_path / "transformer")
  ours_control = SanaControlNetModel.from_pretrained(tmp_path / "controlnet")
  x, t, y, mask = (jnp.asarray(a) for a in odd_inputs(DIMS, h=4, w=4))
  with pytest.raises(sana_jax.SanaError, match="controlnet_cond must be condition latents"):
    ours_control(x, t, y, mask, controlnet_cond=x[:, :2])
  with pytest.raises(sana_jax.SanaError, match="4 ControlNet residuals for a transformer of 4 blocks"):
    ours_base(x, t, y, mask, controlnet_block_samples=jnp.zeros((4, 2, 16, 64)))
  with pytest.raises(sana_jax.SanaError, match="SanaControlNetModel"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path / "controlnet")


@pytest.fixture(scope="module")
def controlnet_pipelines(tmp_path_factory):
  """diffusers' SanaControlNetPipeline of tiny random models (a 1-block ControlNet off init), saved."""
  from reference import byte_bpe_tokenizer, save_tiny_sana_pipeline
  root = tmp_path_factory.mktemp("controlnet_pipe")
  tokenizer = byte_bpe_tokenizer(["a red circle left of a blue square", "edges"], 300)
  base = save_tiny_sana_pipeline(root / "base", tokenizer, dit_options=dict(num_layers=3))
  cfg = base.transformer.config
  torch.manual_seed(2)
  control = shift_off_init(diffusers.SanaControlNetModel(
      in_channels=8, out_channels=8, num_attention_heads=cfg.num_attention_heads,
      attention_head_dim=cfg.attention_head_dim, num_layers=2, num_cross_attention_heads=cfg.num_cross_attention_heads,
      cross_attention_head_dim=cfg.cross_attention_head_dim, cross_attention_dim=cfg.cross_attention_dim,
      caption_channels=cfg.caption_channels, sample_size=cfg.sample_size).eval(), seed=2, scale=0.05)
  ref = diffusers.SanaControlNetPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                         transformer=base.transformer, controlnet=control, scheduler=base.scheduler)
  ref.save_pretrained(root / "pipe")
  return ref, root / "pipe"


def test_pipeline_matches_diffusers_float32(controlnet_pipelines):
  ref, path = controlnet_pipelines
  ours = sana_jax.load_pipeline(path)
  assert type(ours).__name__ == "SanaControlNetPipeline"
  rng = np.random.default_rng(0)
  control = rng.uniform(size=(1, 64, 96, 3)).astype(np.float32)
  latents = rng.standard_normal((1, 16, 24, 8)).astype(np.float32)
  kw = dict(prompt="a red circle left of a blue square", negative_prompt="", height=64, width=96,
            num_inference_steps=3, guidance_scale=4.5, controlnet_conditioning_scale=0.8, use_resolution_binning=False)
  with torch.no_grad():
    want = ref(**kw, control_image=control,  # an array is normalised to [-1, 1] (a torch tensor is used as is)
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np").images
  got = ours(**kw, control_image=control, latents=jnp.asarray(latents), output_type="np").images
  assert np.abs(np.asarray(got) - want).max() < 1e-3
  # scale 0: the transformer's own images
  plain = sana_jax.SanaPipeline(ours.tokenizer, ours.text_encoder, ours.transformer, ours.vae)
  kw.pop("controlnet_conditioning_scale")
  off = ours(**kw, control_image=control, controlnet_conditioning_scale=0.0, latents=jnp.asarray(latents),
             output_type="np").images
  np.testing.assert_allclose(off, plain(**kw, latents=jnp.asarray(latents), output_type="np").images, atol=1e-5)
  with pytest.raises(sana_jax.SanaError, match="needs control_image"):
    ours(**kw)
  with pytest.raises(sana_jax.SanaError, match="needs a ControlNet"):
    plain(**kw, control_image=control)


def test_saved_pipeline_loads_in_diffusers_with_the_same_images(controlnet_pipelines, tmp_path):
  ref, path = controlnet_pipelines
  sana_jax.load_pipeline(path).save_pretrained(tmp_path / "saved")
  theirs = diffusers.SanaControlNetPipeline.from_pretrained(tmp_path / "saved")
  ours = sana_jax.load_pipeline(tmp_path / "saved")
  assert type(ours).__name__ == "SanaControlNetPipeline"
  rng = np.random.default_rng(1)
  control, latents = rng.uniform(size=(1, 64, 64, 3)).astype(np.float32), rng.standard_normal((1, 16, 16, 8))
  kw = dict(prompt="edges", negative_prompt="", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
            controlnet_conditioning_scale=1.3, use_resolution_binning=False, control_image=control, output_type="np")
  with torch.no_grad():
    want = theirs(**kw, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).astype(np.float32))).images
  assert np.abs(np.asarray(ours(**kw, latents=jnp.asarray(latents, jnp.float32)).images) - want).max() < 1e-3


def test_sample_py_control_image(controlnet_pipelines, tmp_path, capsys):
  from PIL import Image

  import sample
  _, path = controlnet_pipelines
  control = tmp_path / "edges.png"
  Image.fromarray((np.random.default_rng(0).uniform(size=(64, 96, 3)) * 255).astype(np.uint8)).save(control)
  base = ["a red circle", "--model", path, "--height", "64", "--width", "96", "--steps", "2", "--dtype", "float32"]
  run = lambda *args: (sample.main([str(a) for a in (*base, *args)]), capsys.readouterr().err)
  status, err = run("--output-dir", tmp_path / "none")
  assert status == 2 and "give --control-image" in err and not (tmp_path / "none").exists()
  status, err = run("--control-image", control, "--control-scale", "0.5", "--output-dir", tmp_path / "out")
  assert status == 0, err
  status, err = run("--control-image", control, "--control-type", "edge", "--output-dir", tmp_path / "out")
  assert status == 0, err
  first, second = (Image.open(tmp_path / "out" / f"000{i}.png").text for i in (0, 1))
  assert first["control_image"] == str(control) and float(first["control_scale"]) == 0.5
  assert (first["control_type"], second["control_type"], float(second["control_scale"])) == ("image", "edge", 1.0)
  status, err = run("--control-type", "edge", "--output-dir", tmp_path / "none")
  assert status == 2 and "give --control-image too" in err
  status, err = run("--control-image", control, "--model", path.parent / "base", "--output-dir", tmp_path / "x")
  assert status == 2 and "--control-image is for a SanaControlNetPipeline" in err
