"""The shipped demo model (sana_jax/assets/sana-shapes): in the package, small, the default of sample.py,
README's prompt drawn right, and the same pipeline for diffusers as for us. (Training its parts:
test_demo_training.py.)"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sana_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(sana_jax.__file__), "assets", "sana-shapes")


def test_demo_model_ships_in_the_package_and_is_small():
  assert os.path.exists(os.path.join(DEMO, "model_index.json"))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DEMO) for f in files)
  assert size <= 25e6
  with open(os.path.join(DEMO, "model_index.json")) as f:
    assert json.load(f)["sana_jax"] == {"complex_human_instruction": [], "max_sequence_length": 16,
                                        "guidance_scale": 3.0}


def readme_prompt():
  """The prompt of README's first command (`python sample.py "..."`)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    block = f.read().split("```")[1]
  return re.search(r'sample\.py "([^"]+)"', block).group(1)


@pytest.mark.slow
def test_readme_command_draws_its_prompt_right(tmp_path):
  """sample.py's defaults (the demo model, its guidance scale, seed 0) on README's prompt: the image the
  newcomer sees is right, and so are the next seeds' (the prompt is not a lucky draw)."""
  from sana_jax.demo import evaluate
  prompt = readme_prompt()
  out = subprocess.run([sys.executable, "sample.py", prompt, "--output-dir", str(tmp_path), "--num-images-per-prompt",
                        "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  images = [Image.open(tmp_path / f"{i:04d}.png") for i in range(4)]
  assert images[0].size == (64, 64) and images[0].text["seed"] == "0"
  assert float(images[0].text["cfg"]) == 3.0  # the model's own guidance scale, no --cfg given
  right = [evaluate.score(prompt, evaluate.detect(np.asarray(im.convert("RGB"))))["correct"] for im in images]
  assert right[0] and sum(right) >= 3, right


@pytest.mark.slow
def test_diffusers_loads_the_demo_model_and_agrees():
  import diffusers
  import torch
  ours = sana_jax.SanaPipeline.from_pretrained(DEMO)
  theirs = diffusers.SanaPipeline.from_pretrained(DEMO)
  latents = np.random.default_rng(0).standard_normal((1, 8, 8, ours.transformer.config.in_channels)).astype(np.float32)
  prompt = "a large yellow square"
  mine = np.asarray(ours(prompt, num_inference_steps=4, guidance_scale=4.5, latents=latents,
                         output_type="latent").images)
  with torch.no_grad():
    ref = theirs(prompt, num_inference_steps=4, guidance_scale=4.5, output_type="latent", max_sequence_length=16,
                 complex_human_instruction=None, use_resolution_binning=False, height=64, width=64,
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
  ref = ref.numpy().transpose(0, 2, 3, 1)
  assert np.abs(mine - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.slow
def test_recipe_runs_stage_by_stage_and_resumes(tmp_path):
  """The recipe's first three stages at toy sizes: each writes its output and its wall time, --stop-after
  ends the run there, and a second run skips what is done."""
  from sana_jax.demo import recipe
  args = ["--work", str(tmp_path), "--captions", "64", "--lm-steps", "3", "--vae-steps", "3", "--vae-images", "32",
          "--images", "24", "--stop-after", "data"]
  assert recipe.main(args) == 0
  log = json.loads((tmp_path / "recipe.json").read_text())
  assert list(log) == ["parts/tokenizer", "parts/vae", "data", "total_seconds"]
  assert log["data"]["train"] == 24 and all(log[k]["seconds"] >= 0 for k in ("parts/tokenizer", "parts/vae", "data"))
  assert (tmp_path / "parts" / "vae" / "config.json").exists() and not (tmp_path / "dit").exists()
  for split in ("train", "validation"):
    assert any(f.endswith(".array_record") for f in os.listdir(tmp_path / "data" / split))
  mtime = (tmp_path / "parts" / "vae" / "config.json").stat().st_mtime
  assert recipe.main(args) == 0  # everything done before: skipped, nothing rewritten
  assert (tmp_path / "parts" / "vae" / "config.json").stat().st_mtime == mtime
