"""SanaPipeline end to end against diffusers' SanaPipeline on a tiny random pipeline saved to disk."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import byte_bpe_tokenizer, rel_err, save_tiny_sana_pipeline

import sana_jax
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION

HEIGHT, WIDTH = 32, 64  # non-square (diffusers wants multiples of 32); 4x DC-AE -> 8 x 16 latents


def tiny_tokenizer():
  return byte_bpe_tokenizer(list(COMPLEX_HUMAN_INSTRUCTION) + ["a red fox in the snow", "a blue house"], 1000)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  ref = save_tiny_sana_pipeline(root, tiny_tokenizer(), downsample_block_type="conv",
                                upsample_block_type="interpolate")
  return ref, sana_jax.SanaPipeline.from_pretrained(root), root


def run_both(ref, ours, steps, guidance, prompts, output_type, seed=0):
  latents = np.random.default_rng(seed).standard_normal((len(prompts), HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32)
  with torch.no_grad():
    theirs = ref(prompts, negative_prompt="", height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                 guidance_scale=guidance, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                 output_type=output_type, use_resolution_binning=False).images
  mine = ours(prompts, negative_prompt="", height=HEIGHT, width=WIDTH, num_inference_steps=steps,
              guidance_scale=guidance, latents=jnp.asarray(latents), output_type=output_type).images
  theirs = np.asarray(theirs.numpy() if hasattr(theirs, "numpy") else theirs)
  if output_type == "latent":
    theirs = theirs.transpose(0, 2, 3, 1)
  return np.asarray(mine), theirs


@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("guidance", [1.0, 4.5, 7.0])
def test_latents_and_images_match_diffusers(pipelines, steps, guidance):
  ref, ours, _ = pipelines
  prompts = ["A Red Fox in the snow", "一只猫 🐱"]
  mine, theirs = run_both(ref, ours, steps, guidance, prompts, "latent")
  assert mine.shape == theirs.shape
  assert rel_err(mine, theirs) <= 1e-3
  if steps == 7:  # decoding too (images in [0, 1], NHWC)
    mine, theirs = run_both(ref, ours, steps, guidance, prompts, "np")
    assert mine.shape == theirs.shape == (2, HEIGHT, WIDTH, 3)
    assert rel_err(mine, theirs) <= 1e-3


def test_euler_sampler_matches_diffusers(pipelines):
  ref, ours, _ = pipelines
  euler_scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  euler = diffusers.SanaPipeline(**{**ref.components, "scheduler": euler_scheduler})
  latents = np.random.default_rng(1).standard_normal((1, HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32)
  with torch.no_grad():
    theirs = euler("a blue house", height=HEIGHT, width=WIDTH, num_inference_steps=7, guidance_scale=4.5,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="latent",
                   use_resolution_binning=False).images.numpy().transpose(0, 2, 3, 1)
  mine = ours("a blue house", height=HEIGHT, width=WIDTH, num_inference_steps=7, guidance_scale=4.5,
              latents=jnp.asarray(latents), output_type="latent", sampler="flow_euler").images
  assert rel_err(np.asarray(mine), theirs) <= 1e-3


def test_pil_output_and_seeded_latents(pipelines):
  _, ours, _ = pipelines
  a = ours("a red fox", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=3, num_images_per_prompt=2).images
  b = ours("a red fox", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=3, num_images_per_prompt=2).images
  assert len(a) == 2 and a[0].size == (WIDTH, HEIGHT)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # different noise per image


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=30), "multiple of 4"), (dict(num_inference_steps=0), "steps"),
    (dict(guidance_scale=float("nan")), "finite"), (dict(guidance_scale=-1.0), "non-negative"),
    (dict(sampler="ddim"), "sampler")])
def test_bad_settings_are_user_errors(pipelines, kwargs, match):
  _, ours, _ = pipelines
  with pytest.raises(sana_jax.SanaError, match=match):
    ours("a red fox", **{"height": HEIGHT, "width": WIDTH, **kwargs})


def run_cli(*args, cwd=None):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "", "XDG_CACHE_HOME": str(cwd or root)}
  return subprocess.run([sys.executable, os.path.join(root, "sample.py"), *map(str, args)], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_cli_writes_pngs_with_metadata(pipelines, tmp_path):
  from PIL import Image
  _, _, model = pipelines
  (tmp_path / "prompts.txt").write_text("a blue house\n\n🐱 猫\n", encoding="utf-8")
  out = tmp_path / "out"
  r = run_cli("a red fox", "--prompt-file", tmp_path / "prompts.txt", "--model", model, "--height", 32, "--width", 64,
              "--steps", 3, "--seed", 5, "--dtype", "float32", "--batch-size", 2, "--output-dir", out, "--pag", 1.5,
              "--pag-layers", 1, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]
  im = Image.open(out / "0002.png")
  assert im.size == (64, 32) and im.text["prompt"] == "🐱 猫" and im.text["seed"] == "7" and im.text["steps"] == "3"
  assert "images/s" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["--height", 30], "not a positive multiple of 4"), (["--steps", 0], "steps"), (["--cfg", "nan"], "finite"),
    (["--cfg", -2], "non-negative"), (["--sampler", "ddim"], "sampler"),
    (["--prompt-file", "nope.txt"], "does not exist"),
    (["--width", 8192], "beyond the largest"), (["--aspect", "wide"], "aspect"), (["--pag", "-1"], "pag"),
    (["--pag", 2, "--pag-layers", 9], "PAG layer"), (["--devices", 0], "--devices 0"),
    (["--devices", 99], "local device")])
def test_cli_errors_are_one_line_exit_2(pipelines, tmp_path, args, match):
  _, _, model = pipelines
  r = run_cli("a red fox", "--model", model, "--output-dir", tmp_path / "out", *args, cwd=tmp_path)
  assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
  assert not (tmp_path / "out").exists()  # nothing written


def test_cli_missing_model_is_one_line_exit_2(tmp_path):
  r = run_cli("a red fox", "--model", tmp_path / "missing", cwd=tmp_path)
  assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_text_keys_values_computed_once_per_generation(pipelines):
  """Each extra step costs one DiT pass without the text projections: those stay outside the loop."""
  from bench.flops import count_macs
  _, ours, _ = pipelines
  embeds, mask, neg, neg_mask = ours.encode_prompt(["a red fox"])
  latents = jnp.zeros((1, HEIGHT // 4, WIDTH // 4, 8))

  def macs(steps):
    run = lambda s, x: ours._generate_impl(s, x, embeds, mask, neg, neg_mask, 4.5, sampler="flow_dpm", steps=steps,
                                           start=0, cfg=True)
    return count_macs(run, ours._dit_inputs(), latents)

  per_step = macs(3) - macs(2)
  x2 = jnp.zeros((2, HEIGHT // 4, WIDTH // 4, 8))
  text = jnp.concatenate([neg, embeds])
  full_forward = count_macs(lambda x: ours.transformer(x, jnp.zeros(2), text, jnp.concatenate([neg_mask, mask])), x2)
  text_only = count_macs(lambda y: ours.transformer.encode_text(y, jnp.concatenate([neg_mask, mask])), text)
  assert per_step == full_forward - text_only and text_only > 0


@pytest.mark.skipif(len(__import__("jax").devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_batch_split_over_local_devices(pipelines):
  _, ours, root = pipelines
  prompts = [f"a red fox number {i}" for i in range(8)]
  latents = jnp.asarray(np.random.default_rng(0).standard_normal((8, HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32))
  kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, latents=latents, output_type="latent")
  assert ours.mesh is not None and ours.mesh.devices.size == 8
  split = ours(prompts, **kw).images
  assert len(split.sharding.device_set) == 8  # the result really lives on all devices
  whole = sana_jax.SanaPipeline.from_pretrained(root, devices=1)(prompts, **kw).images
  assert len(whole.sharding.device_set) == 1
  assert rel_err(np.asarray(split), np.asarray(whole)) <= 1e-5


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_pag_matches_diffusers(pipelines, guidance):
  """Perturbed-attention guidance (identity self-attention in block 1) against SanaPAGPipeline."""
  ref, ours, _ = pipelines
  pag_ref = diffusers.SanaPAGPipeline(**ref.components, pag_applied_layers="transformer_blocks.1")
  latents = np.random.default_rng(2).standard_normal((2, HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32)
  prompts = ["a red fox", "a blue house"]
  with torch.no_grad():
    theirs = pag_ref(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=5, guidance_scale=guidance, pag_scale=2.0,
                     latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="latent",
                     use_resolution_binning=False).images.numpy().transpose(0, 2, 3, 1)
  mine = ours(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=5, guidance_scale=guidance, pag_scale=2.0,
              pag_applied_layers=["transformer_blocks.1"], latents=jnp.asarray(latents), output_type="latent").images
  plain = ours(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=5, guidance_scale=guidance,
               latents=jnp.asarray(latents), output_type="latent").images
  assert rel_err(np.asarray(mine), theirs) <= 1e-3
  assert rel_err(np.asarray(mine), np.asarray(plain)) > 1e-3  # PAG really changed the result


def test_empty_prompt_works(pipelines):
  _, ours, _ = pipelines
  images = ours("", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=0, output_type="np").images
  assert images.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def test_diffusers_call_arguments_match(pipelines):
  """max_sequence_length, complex_human_instruction, prompt / negative embeddings and return_dict as
  diffusers' SanaPipeline takes them."""
  ref, ours, _ = pipelines
  latents = np.random.default_rng(4).standard_normal((2, HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32)
  prompts = ["a red fox in the snow", "a blue house"]
  common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=4.5, output_type="latent")
  text = dict(max_sequence_length=12, complex_human_instruction=["Describe:", "Prompt: "])
  with torch.no_grad():
    theirs = ref(prompts, negative_prompt="blurry", latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                 use_resolution_binning=False, **common, **text).images.numpy().transpose(0, 2, 3, 1)
  mine = ours(prompts, negative_prompt="blurry", latents=latents, **common, **text).images
  assert rel_err(np.asarray(mine), theirs) <= 1e-3
  embeds, mask, neg, neg_mask = ours.encode_prompt(prompts, True, "blurry", **text)
  assert embeds.shape[1] == 12
  (from_embeds,) = ours(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                        negative_prompt_attention_mask=neg_mask, latents=latents, return_dict=False, **common)
  assert rel_err(np.asarray(from_embeds), theirs) <= 1e-3
  with torch.no_grad():
    theirs_embeds = ref(negative_prompt=None, prompt_embeds=torch.from_numpy(np.array(embeds)),
                        prompt_attention_mask=torch.from_numpy(np.array(mask)),
                        negative_prompt_embeds=torch.from_numpy(np.array(neg)),
                        negative_prompt_attention_mask=torch.from_numpy(np.array(neg_mask)),
                        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), use_resolution_binning=False,
                        **common).images.numpy().transpose(0, 2, 3, 1)
  assert rel_err(theirs_embeds, theirs) <= 1e-5


def test_image_to_image_properties(pipelines):
  """Base Sana image-to-image (diffusers has none): strength 1.0 is text-to-image from the same noise;
  a small strength stays near the image's latents, and nearer the smaller it is."""
  _, ours, _ = pipelines
  latents = np.random.default_rng(5).standard_normal((1, HEIGHT // 4, WIDTH // 4, 8)).astype(np.float32)
  image = np.random.default_rng(6).uniform(0, 1, (1, HEIGHT, WIDTH, 3)).astype(np.float32)
  kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=20, guidance_scale=4.5, latents=latents,
            output_type="latent")
  text_to_image = np.asarray(ours("a red fox", **kw).images)
  assert np.array_equal(np.asarray(ours("a red fox", image=image, strength=1.0, **kw).images), text_to_image)
  target = np.asarray(ours._image_latents(ours._image_pixels(image, 1, (HEIGHT, WIDTH))))
  far = rel_err(text_to_image, target)
  # at 20 steps these start at sigma 0.136, 0.428 and 0.785
  distances = [rel_err(ours("a red fox", image=image, strength=s, **kw).images, target) for s in (0.2, 0.5, 0.8)]
  assert distances[0] < 0.2 * far and distances == sorted(distances), (distances, far)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_embeds=np.zeros((1, 5, 32))), "without prompt_attention_mask"),
    (dict(prompt_embeds=np.zeros((1, 5, 7)), prompt_attention_mask=np.ones((1, 5))), "tokens, 32"),
    (dict(complex_human_instruction="one string"), "complex_human_instruction"),
    (dict(max_sequence_length=1), "max_sequence_length"),
    (dict(clean_caption=True), "clean_caption"),
    (dict(image=np.zeros((1, 8, 8, 3)), strength=1.5), "strength"),
    (dict(image=np.zeros((3, 8, 8, 3))), "3 images for 1 generated images"),
    (dict(image=np.zeros((1, 8, 8, 3)), strength=0.01), "below the smallest noise level"),
    (dict(prompt=None), "prompt: expected a string"),
])
def test_bad_call_arguments_are_one_line_errors(pipelines, kwargs, match):
  _, ours, _ = pipelines
  kwargs = {"prompt": "a fox", **kwargs}
  with pytest.raises(sana_jax.SanaError, match=match):
    ours(height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="latent", **kwargs)
