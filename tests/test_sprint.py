"""SanaSprintPipeline against diffusers' SanaSprintPipeline and SanaSprintImg2ImgPipeline on a tiny random
Sprint pipeline saved to disk, with the same initial and per-step noise on both sides."""
import diffusers
import numpy as np
import pytest
import torch
from reference import nhwc_to_nchw, rel_err, save_tiny_sana_pipeline
from test_pipeline import tiny_tokenizer

import sana_jax
from sana_jax.errors import SanaError

HEIGHT, WIDTH = 32, 64  # non-square; 4x DC-AE -> 8 x 16 latents
LATENT = (HEIGHT // 4, WIDTH // 4, 8)
PROMPTS = ["A Red Fox in the snow", "一只猫 🐱"]


@pytest.fixture(scope="module")
def sprint(tmp_path_factory):
  root = tmp_path_factory.mktemp("sprint")
  # timestep_scale is SanaPipeline's (the Sprint teacher's); diffusers' Sprint pipelines ignore it
  ref = save_tiny_sana_pipeline(root, tiny_tokenizer(), sprint=True, dit_options=dict(timestep_scale=1000.0),
                                downsample_block_type="conv", upsample_block_type="interpolate")
  return ref, sana_jax.load_pipeline(root), root


def draws(seed, steps, n=2):
  """Standard-normal initial latents [n, h, w, C] and per-step noise [steps - 1, n, h, w, C]."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, *LATENT)).astype(np.float32),
          rng.standard_normal((steps - 1, n, *LATENT)).astype(np.float32))


def replace_draws(monkeypatch, module, arrays):
  """diffusers' randn_tensor in `module` returns `arrays` (NHWC, in order), then zeros."""
  queue = [nhwc_to_nchw(a) for a in arrays]

  def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    out = queue.pop(0) if queue else torch.zeros(shape)
    assert tuple(out.shape) == tuple(shape)
    return out.to(dtype) if dtype is not None else out

  monkeypatch.setattr(module, "randn_tensor", randn_tensor)


def run_diffusers(pipe, monkeypatch, latents, step_noise, output_type, image=None, **kwargs):
  import diffusers.schedulers.scheduling_scm as scm
  if image is None:
    kwargs["latents"] = nhwc_to_nchw(latents)
  else:  # img2img draws its initial noise itself
    import diffusers.pipelines.sana.pipeline_sana_sprint_img2img as img2img
    replace_draws(monkeypatch, img2img, [latents])
    kwargs["image"] = image
  replace_draws(monkeypatch, scm, list(step_noise))
  with torch.no_grad():
    out = pipe(PROMPTS, height=HEIGHT, width=WIDTH, output_type=output_type, use_resolution_binning=False,
               **kwargs).images
  out = np.asarray(out.numpy() if hasattr(out, "numpy") else out)
  return out.transpose(0, 2, 3, 1) if output_type == "latent" else out


@pytest.mark.parametrize("steps, guidance", [(1, 4.5), (2, 4.5), (2, 1.0), (4, 7.0)])
def test_text_to_image_matches_diffusers(sprint, monkeypatch, steps, guidance):
  ref, ours, _ = sprint
  latents, step_noise = draws(steps, steps)
  for output_type, tol in (("latent", 1e-4), ("np", 1e-3)) if steps == 2 else (("latent", 1e-4),):
    # diffusers refuses a step count other than 2 unless intermediate_timesteps=None is passed
    theirs = run_diffusers(ref, monkeypatch, latents, step_noise, output_type, num_inference_steps=steps,
                           guidance_scale=guidance, intermediate_timesteps=1.3 if steps == 2 else None)
    mine = ours(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                latents=latents, step_noise=step_noise, output_type=output_type).images
    assert np.asarray(mine).shape == theirs.shape
    assert rel_err(mine, theirs) <= tol, output_type


def test_own_timesteps_match_diffusers(sprint, monkeypatch):
  """diffusers' own path for custom timesteps raises a TypeError (retrieve_timesteps leaves out
  num_inference_steps): the reference gets them through the scheduler directly."""
  import diffusers.pipelines.sana.pipeline_sana_sprint as module

  def retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas=None, **kwargs):
    scheduler.set_timesteps(len(timesteps) - 1, timesteps=timesteps, device=device, **kwargs)
    return scheduler.timesteps, len(timesteps) - 1

  monkeypatch.setattr(module, "retrieve_timesteps", retrieve_timesteps)
  ref, ours, _ = sprint
  angles = [1.5, 1.1, 0.4, 0.0]
  latents, step_noise = draws(5, 3)
  theirs = run_diffusers(ref, monkeypatch, latents, step_noise, "latent", num_inference_steps=3, timesteps=angles,
                         max_timesteps=None, intermediate_timesteps=None)
  mine = ours(PROMPTS, num_inference_steps=3, timesteps=angles, height=HEIGHT, width=WIDTH, latents=latents,
              step_noise=step_noise, output_type="latent").images
  assert rel_err(mine, theirs) <= 1e-4


@pytest.mark.parametrize("steps, strength", [(2, 0.6), (4, 0.5), (4, 0.3)])
def test_image_to_image_matches_diffusers(sprint, monkeypatch, steps, strength):
  ref, _, root = sprint
  img2img = diffusers.SanaSprintImg2ImgPipeline(**ref.components)
  img2img.save_pretrained(root.parent / "sprint_img2img")
  ours = sana_jax.load_pipeline(root.parent / "sprint_img2img")
  assert type(ours) is sana_jax.SanaSprintPipeline
  image = np.random.default_rng(7).uniform(0, 1, (len(PROMPTS), HEIGHT, WIDTH, 3)).astype(np.float32)
  latents, step_noise = draws(11, steps)
  start = int(steps - steps * strength)
  for output_type, tol in (("latent", 1e-4), ("np", 1e-3)):
    theirs = run_diffusers(img2img, monkeypatch, latents, step_noise[start:], output_type, image=image,
                           strength=strength, num_inference_steps=steps, guidance_scale=4.5,
                           intermediate_timesteps=1.3 if steps == 2 else None)
    mine = ours(PROMPTS, num_inference_steps=steps, height=HEIGHT, width=WIDTH, latents=latents,
                step_noise=step_noise, image=image, strength=strength, output_type=output_type).images
    assert rel_err(mine, theirs) <= tol, output_type


def test_bfloat16_within_2e_2_of_diffusers_float32(sprint, monkeypatch):
  ref, _, root = sprint
  ours = sana_jax.load_pipeline(root, dtype="bfloat16")
  latents, step_noise = draws(3, 2)
  theirs = run_diffusers(ref, monkeypatch, latents, step_noise, "np", num_inference_steps=2, guidance_scale=4.5)
  mine = ours(PROMPTS, height=HEIGHT, width=WIDTH, latents=latents, step_noise=step_noise, output_type="np").images
  assert rel_err(mine, theirs) <= 2e-2


def test_seeded_runs_repeat_and_batch_rows_are_their_own(sprint):
  _, ours, _ = sprint
  kw = dict(height=HEIGHT, width=WIDTH, output_type="latent", num_inference_steps=3)
  a = np.asarray(ours(PROMPTS, seed=5, **kw).images)
  b = np.asarray(ours(PROMPTS, seed=5, **kw).images)
  c = np.asarray(ours(PROMPTS, seed=6, **kw).images)
  assert np.array_equal(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(timesteps=[1.5, 0.0]), "timesteps: 2 values for 2 steps"),
    (dict(num_inference_steps=2, timesteps=[1.0, 1.2, 0.0]), "falling strictly"),
    (dict(max_timesteps=2.0), "max_timesteps"),
    (dict(intermediate_timesteps=1.6), "intermediate_timesteps"),
    (dict(step_noise=np.zeros((2, 1, *LATENT), np.float32)), "step_noise of shape"),
    (dict(image=np.zeros((1, 8, 8, 3)), strength=0.0), "strength"),
    (dict(image=np.full((1, 8, 8, 3), 2.0)), "pixel values"),
    (dict(clean_caption=True), "clean_caption"),
])
def test_bad_arguments_are_one_line_errors(sprint, kwargs, match):
  _, ours, _ = sprint
  with pytest.raises(SanaError, match=match):
    ours("a fox", height=HEIGHT, width=WIDTH, output_type="latent", **kwargs)


def test_base_pipeline_refuses_a_sprint_directory(sprint):
  _, _, root = sprint
  with pytest.raises(SanaError, match="SanaSprintPipeline: load it with sana_jax.load_pipeline"):
    sana_jax.SanaPipeline.from_pretrained(root)


@pytest.mark.slow
def test_cli_samples_sprint_image_to_image(sprint, tmp_path):
  """sample.py on a Sprint directory: 2 steps by default; --image / --strength recorded in the PNG;
  the CLI's image for a seed is the API's for the same seed and image."""
  from PIL import Image
  from test_pipeline import run_cli
  _, ours, root = sprint
  source = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(source)
  out = tmp_path / "out"
  r = run_cli("a red fox", "--seed", 3, "--image", source, "--strength", 0.5, "--model", root, "--height", HEIGHT,
              "--width", WIDTH, "--dtype", "float32", "--output-dir", out, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  written = Image.open(out / "0000.png")
  assert written.text["steps"] == "2" and written.text["sampler"] == "scm"
  assert written.text["strength"] == "0.5" and written.text["image"] == str(source)
  api = ours("a red fox", seed=3, image=Image.open(source), strength=0.5, height=HEIGHT, width=WIDTH).images[0]
  assert np.abs(np.asarray(api, np.int16) - np.asarray(written, np.int16)).max() <= 1


@pytest.mark.parametrize("args, match", [
    (["--sampler", "flow_dpm"], "takes no --sampler"), (["--pag", 1], "takes no --pag"),
    (["--negative-prompt", "blurry"], "takes no --negative-prompt"), (["--strength", 0.5], "give --image too"),
    (["--image", "missing.png"], "does not exist"), (["--image", "in.png", "--strength", 0], "--strength 0.0"),
    (["--image", "not_an_image.png"], "not an image"),
])
def test_cli_errors_are_one_line_exit_2(sprint, tmp_path, args, match):
  from test_pipeline import run_cli
  _, _, root = sprint
  (tmp_path / "not_an_image.png").write_text("hello")
  (tmp_path / "in.png").write_bytes(b"")
  r = run_cli("a red fox", "--model", root, "--output-dir", tmp_path / "out", *args, cwd=tmp_path)
  assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
  assert not (tmp_path / "out").exists()


def test_save_pretrained_round_trips_through_diffusers(sprint, monkeypatch, tmp_path):
  ref, ours, _ = sprint
  ours.save_pretrained(tmp_path / "saved")
  again = diffusers.SanaSprintPipeline.from_pretrained(tmp_path / "saved")
  assert isinstance(again.scheduler, diffusers.SCMScheduler) and again.scheduler.config.sigma_data == 0.5
  latents, step_noise = draws(9, 2)
  theirs = run_diffusers(again, monkeypatch, latents, step_noise, "latent", num_inference_steps=2)
  mine = sana_jax.load_pipeline(tmp_path / "saved")(PROMPTS, height=HEIGHT, width=WIDTH, latents=latents,
                                                     step_noise=step_noise, output_type="latent").images
  assert rel_err(mine, theirs) <= 1e-4
