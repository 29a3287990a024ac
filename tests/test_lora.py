"""LoRA files from diffusers / peft on our pipelines, against diffusers' load_lora_weights on the same
tiny random pipelines: two adapters (ranks 4 and 2, alphas 8 and 3, attention, Mix-FFN, caption, time
and patch targets, lora_B moved off its zero init), weighted, fused, unfused and unloaded."""
import diffusers
import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file
from test_pipeline import pipelines, run_both  # noqa: F401 - the tiny diffusers pipeline saved to disk
from test_sprint import draws, run_diffusers, sprint  # noqa: F401

import sana_jax
from sana_jax.convert import diffusers_lora
from sana_jax.errors import SanaError

ADAPTERS = {  # name: (rank, alpha, peft target_modules)
    "style": (4, 8, ["to_q", "to_v", "conv_inverted", "attn2.to_out.0"]),
    "detail": (2, 3, ["to_k", "conv_point", "caption_projection.linear_1", "time_embed.linear", "proj_out",
                      "patch_embed.proj"]),
}


def save_lora(transformer, directory, name, seed):
  """A peft adapter on a copy of `transformer`, lora_B off its zero init, saved as diffusers saves it."""
  import copy
  rank, alpha, targets = ADAPTERS[name]
  model = copy.deepcopy(transformer)
  model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), adapter_name=name)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "lora_" in key:
        p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in key else 0.5))
  metadata = model.peft_config[name].to_dict()
  diffusers.SanaPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(
      model, adapter_name=name), transformer_lora_adapter_metadata=metadata)
  return str(directory)


@pytest.fixture(scope="module")
def loras(pipelines, tmp_path_factory):  # noqa: F811
  ref, _, _ = pipelines
  root = tmp_path_factory.mktemp("loras")
  return {name: save_lora(ref.transformer, root / name, name, seed) for seed, name in enumerate(ADAPTERS)}


def compare(ref, ours, steps=3, guidance=4.5):
  mine, theirs = run_both(ref, ours, steps, guidance, ["a red fox in the snow", "a blue house"], "np")
  return float(np.abs(mine - theirs).max())


def test_adapters_weights_fuse_unfuse_unload_match_diffusers(pipelines, loras):  # noqa: F811
  ref, ours, root = pipelines
  ref = diffusers.SanaPipeline.from_pretrained(root)  # its own copy: the shared one stays without LoRA
  ours = sana_jax.SanaPipeline.from_pretrained(root)
  base_images, _ = run_both(ref, ours, 3, 4.5, ["a red fox in the snow", "a blue house"], "np")
  base_state = ours._dit_state
  for p in (ref, ours):
    p.load_lora_weights(loras["style"])
    p.load_lora_weights(loras["detail"], adapter_name="detail")
  assert ours.get_active_adapters() == ref.get_active_adapters() == ["detail"]
  assert ours.get_list_adapters() == {"transformer": ["default_0", "detail"]}
  assert compare(ref, ours) < 1e-4

  for p in (ref, ours):
    p.set_adapters(["default_0", "detail"], [0.7, -0.4])
  lora_images, theirs = run_both(ref, ours, 3, 4.5, ["a red fox in the snow", "a blue house"], "np")
  compiled = ours._generate._cache_size()
  assert np.abs(lora_images - theirs).max() < 1e-4
  assert np.abs(lora_images - base_images).max() > 0.05  # the adapters do change the images
  for p in (ref, ours):
    p.set_adapters(["default_0", "detail"], [1.0, 0.5])
  assert compare(ref, ours) < 1e-4
  assert ours._generate._cache_size() == compiled  # new weights, no new compile

  for p in (ref, ours):
    p.fuse_lora(lora_scale=0.5)
  assert compare(ref, ours) < 1e-4
  for p in (ref, ours):
    p.unfuse_lora()
  for a, b in zip(jax.tree.leaves(ours._dit_state), jax.tree.leaves(base_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
  # unfused, the adapters apply again: ours at their set weights; diffusers' stay multiplied by the
  # fuse's lora_scale (peft's scale_layer is not undone), so both are given the weights anew
  for p in (ref, ours):
    p.set_adapters(["default_0", "detail"], [1.0, 0.5])
  assert compare(ref, ours) < 1e-4

  for p in (ref, ours):
    p.delete_adapters("detail")
  assert ours.get_active_adapters() == ref.get_active_adapters() == ["default_0"]
  assert ours.get_list_adapters() == {"transformer": ["default_0"]}
  for p in (ref, ours):
    p.set_adapters("default_0")
    p.fuse_lora()
    p.unload_lora_weights()  # fused then unloaded: the LoRA stays baked in, as in diffusers
  assert ours.get_list_adapters() == {"transformer": []}
  assert compare(ref, ours) < 1e-4


def test_sprint_pipeline_applies_lora_as_diffusers_does(sprint, tmp_path, monkeypatch):  # noqa: F811
  ref, ours, root = sprint
  path = save_lora(ref.transformer, tmp_path / "lora", "style", seed=3)
  ours = sana_jax.load_pipeline(root)
  ref = diffusers.SanaSprintPipeline.from_pretrained(root)
  for p in (ref, ours):
    p.load_lora_weights(path, adapter_name="s")
    p.set_adapters("s", 0.8)
  latents, step_noise = draws(0, 2)
  theirs = run_diffusers(ref, monkeypatch, latents, step_noise, "np", num_inference_steps=2)
  mine = ours(["A Red Fox in the snow", "一只猫 🐱"], height=32, width=64, latents=latents, step_noise=step_noise,
              output_type="np", use_resolution_binning=False).images
  assert np.abs(np.asarray(mine) - theirs).max() < 1e-4


def test_files_without_metadata_use_alpha_keys_or_the_rank(pipelines, loras, tmp_path):  # noqa: F811
  ref, ours, root = pipelines
  ours = sana_jax.SanaPipeline.from_pretrained(root)
  tensors = diffusers_lora.safetensors_io.read_file(f"{loras['style']}/{diffusers_lora.WEIGHT_NAME}")
  tensors = {k: np.array(v) for k, v in tensors.items()}
  save_file(tensors, str(tmp_path / "bare.safetensors"))  # no metadata: alpha = rank, scale 1
  alphas = {k.replace("lora_A.weight", "alpha"): np.array(8.0, np.float32) for k in tensors if "lora_A" in k}
  save_file({**tensors, **alphas}, str(tmp_path / "alphas.safetensors"))  # kohya's alpha keys
  ours.load_lora_weights(str(tmp_path / "bare.safetensors"), adapter_name="bare")
  ours.load_lora_weights(str(tmp_path / "alphas.safetensors"), adapter_name="alphas")
  ours.load_lora_weights(loras["style"], adapter_name="meta")
  ours.load_lora_weights(tensors, adapter_name="dict")  # a state dict, as diffusers also takes
  scales = {n: float(np.max(ours._adapters[n][("blocks", "attn1", "to_q", "kernel")].scale)) for n in ours._adapters}
  assert scales == {"bare": 1.0, "alphas": 2.0, "meta": 2.0, "dict": 1.0}
  ref = diffusers.SanaPipeline.from_pretrained(root)
  ref.load_lora_weights(str(tmp_path / "bare.safetensors"))
  ours.set_adapters("bare")
  assert compare(ref, ours, steps=2) < 1e-4


@pytest.mark.parametrize("key, shape, match", [
    ("transformer.transformer_blocks.0.ff.conv_depth", (2, 1, 3, 3), "conv_depth.*not a linear"),
    ("transformer.transformer_blocks.0.attn1.to_qq", (2, 64), "attn1.to_qq.*no such linear layer"),
    ("transformer.transformer_blocks.7.attn1.to_q", (2, 64), "transformer_blocks.7.*no such"),
    ("text_encoder.layers.0.q_proj", (2, 32), "not a transformer LoRA key"),
    ("transformer.transformer_blocks.0.attn1.to_q", (2, 63), "do not fit"),
])
def test_bad_lora_files_are_one_line_errors(pipelines, tmp_path, key, shape, match):  # noqa: F811
  ours = pipelines[1]
  b_shape = (shape[0], shape[0], 1, 1) if len(shape) == 4 else (64, shape[0])
  tensors = {f"{key}.lora_A.weight": np.ones(shape, np.float32), f"{key}.lora_B.weight": np.ones(b_shape, np.float32)}
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  with pytest.raises(SanaError, match=match):
    ours.load_lora_weights(str(tmp_path / "bad.safetensors"))
  assert ours.get_list_adapters() == {"transformer": []}


def test_bad_adapter_calls_are_one_line_errors(pipelines, loras):  # noqa: F811
  ours = sana_jax.SanaPipeline.from_pretrained(pipelines[2])
  with pytest.raises(SanaError, match="no such file"):
    ours.load_lora_weights("/nonexistent/lora")
  ours.load_lora_weights(loras["style"], adapter_name="a")
  with pytest.raises(SanaError, match="already in use"):
    ours.load_lora_weights(loras["style"], adapter_name="a")
  with pytest.raises(SanaError, match="no adapter named 'b'"):
    ours.set_adapters(["a", "b"])
  with pytest.raises(SanaError, match="one per adapter"):
    ours.set_adapters(["a"], [1.0, 2.0])
  ours.fuse_lora()
  with pytest.raises(SanaError, match="unfuse_lora"):
    ours.set_adapters("a", 0.5)


@pytest.mark.slow
def test_cli_applies_loras_and_records_them(pipelines, loras, tmp_path):  # noqa: F811
  import json

  from PIL import Image
  from test_pipeline import run_cli

  from sana_jax.pipeline import prng_key
  _, _, root = pipelines
  out = tmp_path / "out"
  r = run_cli("a red fox", "--model", root, "--height", 32, "--width", 64, "--steps", 3, "--dtype", "float32",
              "--output-dir", out, "--lora", loras["style"], "--lora", f"{loras['detail']}:-0.5", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  image = Image.open(out / "0000.png")
  assert json.loads(image.text["lora"]) == [{"path": loras["style"], "scale": 1.0},
                                             {"path": loras["detail"], "scale": -0.5}]
  ours = sana_jax.SanaPipeline.from_pretrained(root)
  ours.load_lora_weights(loras["style"], adapter_name="a")
  ours.load_lora_weights(loras["detail"], adapter_name="b")
  ours.set_adapters(["a", "b"], [1.0, -0.5])
  latents = jax.random.normal(prng_key(0), (1, 8, 16, 8))
  expected = ours("a red fox", height=32, width=64, num_inference_steps=3, latents=latents, output_type="np").images
  assert np.abs(np.asarray(image, np.float32) / 255 - expected[0]).max() <= 1.5 / 255
  for args, match in (([str(tmp_path / "none")], "no such file"), ([f"{loras['style']}:nan"], "finite"),
                      ([str(out / "0000.png")], "safetensors")):
    r = run_cli("a red fox", "--model", root, "--output-dir", tmp_path / "bad", "--lora", *args, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "bad").exists()
