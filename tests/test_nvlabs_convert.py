"""Original NVlabs/Sana checkpoints (.pth) -> diffusers directories and our model.

Original-layout files are made here from tiny random diffusers models by the conversion rows read
backwards, saved with torch.save with the keys the original carries beyond diffusers' (pos_embed,
y_embedding, logvar_linear); converted, then loaded by diffusers and by sana_jax and compared with the
source model.
"""
import json
import os
import re

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import byte_bpe_tokenizer, rel_err, save_tiny_sana_pipeline, shift_off_init
from test_dit_parity import odd_inputs, reference_forward

import sana_jax
from sana_jax.convert import diffusers_dit, nvlabs, safetensors_io
from sana_jax.convert.__main__ import main as convert_main

HEADS = dict(num_attention_heads=2, attention_head_dim=32, num_cross_attention_heads=2, cross_attention_head_dim=24)
TINY = dict(in_channels=4, out_channels=4, num_layers=3, cross_attention_dim=64, caption_channels=40, **HEADS)
VARIANTS = {  # diffusers settings, --resolution (None: from pos_embed)
    "sana_1_0_512px": (dict(sample_size=16), 512),
    "sana_1_5_2048px_bias": (dict(qk_norm="rms_norm_across_heads", attention_bias=True, sample_size=64,
                                  interpolation_scale=1.0), None),
    "sprint_1024px": (dict(guidance_embeds=True, qk_norm="rms_norm_across_heads", sample_size=32), 1024),
}


def tiny_dit(seed=0, **overrides):
  torch.manual_seed(seed)
  return shift_off_init(diffusers.SanaTransformer2DModel(**{**TINY, **overrides}).eval(), seed=seed)


def original_state(model, rows, extras=True):
  """The model's weights in the original layout (torch tensors), with the keys diffusers drops."""
  state = nvlabs.to_original({k: v.numpy() for k, v in model.state_dict().items()}, rows)
  out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  if extras:
    cfg = model.config
    out["pos_embed"] = torch.randn(1, (cfg.sample_size // cfg.patch_size) ** 2, cfg.cross_attention_dim)
    out["y_embedder.y_embedding"] = torch.randn(300, cfg.caption_channels)
    if cfg.guidance_embeds:
      out["logvar_linear.weight"], out["logvar_linear.bias"] = torch.randn(1, cfg.cross_attention_dim), torch.randn(1)
  return out


def save_pth(path, state, dtype=torch.float32):
  torch.save({"state_dict": {k: v.to(dtype) for k, v in state.items()}, "epoch": 3}, path)
  return path


def write_heads(tmp_path):
  path = tmp_path / "heads.json"
  path.write_text(json.dumps(HEADS))
  return str(path)


def convert(capsys, *args):
  status = convert_main([str(a) for a in args])
  return status, capsys.readouterr()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_checkpoint_loads_in_diffusers_and_sana_jax(tmp_path, capsys, variant):
  overrides, resolution = VARIANTS[variant]
  ref = tiny_dit(**overrides)
  pth = save_pth(tmp_path / "model.pth", original_state(ref, nvlabs.transformer_rows(ref.config.guidance_embeds)))
  res = [] if resolution is None else ["--resolution", resolution]
  status, out = convert(capsys, pth, "--out", tmp_path / "out", "--config", write_heads(tmp_path), *res)
  assert status == 0, out.err
  assert "SanaTransformer2DModel from model.pth (3 blocks of width 64" in out.out

  loaded = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "out").eval()
  expected = ref.state_dict()
  got = loaded.state_dict()
  assert sorted(got) == sorted(expected)
  for name in expected:
    assert torch.equal(got[name], expected[name]), name
  for key in ("sample_size", "interpolation_scale", "qk_norm", "guidance_embeds", "attention_bias", "num_layers"):
    assert loaded.config[key] == ref.config[key], key

  cfg = dict(ref.config)
  x, t, y, mask = odd_inputs(cfg, h=5, w=7)
  g = np.array([4.5, 3.0], np.float32) if cfg["guidance_embeds"] else None
  want = reference_forward(ref, x, t, y, mask, guidance=g)
  np.testing.assert_allclose(reference_forward(loaded, x, t, y, mask, guidance=g), want, rtol=0, atol=1e-6)
  for ours in (sana_jax.SanaTransformer.from_pretrained(tmp_path / "out"),
               sana_jax.SanaTransformer.from_single_file(pth, resolution=resolution, config=HEADS)):
    assert rel_err(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask), guidance=g), want) < 1e-4


def test_bfloat16_checkpoint_keeps_its_dtype_unless_asked(tmp_path, capsys):
  ref = tiny_dit(sample_size=32)
  pth = save_pth(tmp_path / "bf16.pth", original_state(ref, nvlabs.transformer_rows()), torch.bfloat16)
  heads = write_heads(tmp_path)
  assert convert(capsys, pth, "--out", tmp_path / "bf16", "--config", heads)[0] == 0  # resolution from pos_embed
  assert convert(capsys, pth, "--out", tmp_path / "fp32", "--config", heads, "--dtype", "float32")[0] == 0
  as_stored = safetensors_io.read_dir(tmp_path / "bf16", "diffusion_pytorch_model")
  widened = safetensors_io.read_dir(tmp_path / "fp32", "diffusion_pytorch_model")
  for name, w in ref.state_dict().items():
    rounded = w.to(torch.bfloat16).float().numpy()
    assert as_stored[name].dtype == "bfloat16" and widened[name].dtype == np.float32
    np.testing.assert_array_equal(as_stored[name].astype(np.float32), rounded)
    np.testing.assert_array_equal(widened[name], rounded)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["sample_size"] == 32

  rounded_ref = tiny_dit(sample_size=32)
  rounded_ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
  x, t, y, mask = odd_inputs(dict(rounded_ref.config), h=4, w=6)
  ours = sana_jax.SanaTransformer.from_single_file(pth, config=HEADS)
  assert rel_err(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask)),
                 reference_forward(rounded_ref, x, t, y, mask)) < 1e-4


def test_sana_1_0_mapping_agrees_with_diffusers_single_file_converter():
  from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers
  ref = tiny_dit(sample_size=32)
  original = original_state(ref, nvlabs.transformer_rows())
  theirs = convert_sana_transformer_to_diffusers(dict(original))
  ours = nvlabs.to_diffusers({k: v.numpy() for k, v in original.items()}, nvlabs.transformer_rows())
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name].numpy())


def test_controlnet_checkpoint_becomes_a_diffusers_controlnet(tmp_path, capsys):
  base = tiny_dit(sample_size=32)
  torch.manual_seed(1)
  control = shift_off_init(diffusers.SanaControlNetModel(
      **{k: v for k, v in TINY.items() if k != "num_layers"}, num_layers=2, sample_size=32).eval(), seed=1)
  shared = {k: v for k, v in base.state_dict().items() if k.startswith(("patch_embed", "time_embed", "caption"))}
  control.load_state_dict(shared, strict=False)  # the original shares the base's embedders
  state = {**original_state(base, nvlabs.transformer_rows(controlnet=True)),
           **original_state(control, nvlabs.controlnet_rows(), extras=False)}
  assert {"controlnet.0.before_proj.weight", "controlnet.1.after_proj.bias",
          "controlnet.1.copied_block.attn.qkv.weight"} <= set(state)
  pth = save_pth(tmp_path / "controlnet.pth", state)
  status, out = convert(capsys, pth, "--out", tmp_path / "cn", "--config", write_heads(tmp_path))
  assert status == 0, out.err
  assert "SanaControlNetModel" in out.out and "a ControlNet of 2 blocks" in out.out
  loaded = diffusers.SanaControlNetModel.from_pretrained(tmp_path / "cn").eval()
  for name, w in control.state_dict().items():
    assert torch.equal(loaded.state_dict()[name], w), name
  # both models of the same file, straight into ours
  ours = sana_jax.SanaTransformer.from_single_file(pth, config=HEADS)
  x, t, y, mask = odd_inputs(dict(base.config), h=4, w=6)
  assert rel_err(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask)),
                 reference_forward(base, x, t, y, mask)) < 1e-4
  cond = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  ours_control = sana_jax.SanaControlNetModel.from_single_file(pth, config=HEADS)
  kw = dict(encoder_hidden_states=torch.from_numpy(y), encoder_attention_mask=torch.from_numpy(mask),
            timestep=torch.from_numpy(t))
  with torch.no_grad():
    want = control(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                   controlnet_cond=torch.from_numpy(cond.transpose(0, 3, 1, 2).copy()), **kw)[0]
  got = ours_control(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask),
                     controlnet_cond=jnp.asarray(cond))
  assert rel_err(got, np.stack([s.numpy() for s in want])) < 1e-4
  plain = save_pth(tmp_path / "plain.pth", original_state(base, nvlabs.transformer_rows()))
  with pytest.raises(sana_jax.SanaError, match="not a ControlNet checkpoint"):
    sana_jax.SanaControlNetModel.from_single_file(plain, config=HEADS)


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
  """A tiny diffusers SanaPipeline directory (DiT at 512 px) and its heads as a --config file."""
  root = tmp_path_factory.mktemp("base")
  tokenizer = byte_bpe_tokenizer(["a red circle", "a blue square on grass"], 300)
  ref = save_tiny_sana_pipeline(root / "pipe", tokenizer, dit_options=dict(sample_size=16))
  (root / "heads.json").write_text(json.dumps({k: ref.transformer.config[k] for k in HEADS}))
  return ref, root / "pipe", root / "heads.json"


@pytest.mark.slow
def test_pipeline_assembled_from_a_base_directory_samples_like_the_source(tmp_path, capsys, base_pipeline):
  ref, base, heads = base_pipeline
  pth = save_pth(tmp_path / "model.pth", original_state(ref.transformer, nvlabs.transformer_rows()))
  status, out = convert(capsys, pth, "--out", tmp_path / "pipe", "--config", heads, "--resolution", 512,
                        "--pipeline", base)
  assert status == 0, out.err
  assert sorted(os.listdir(tmp_path / "pipe")) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                  "transformer", "vae"]
  scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["_class_name"] == "DPMSolverMultistepScheduler" and scheduler["flow_shift"] == 3.0

  kw = dict(prompt="a red circle", negative_prompt="", height=64, width=96, num_inference_steps=3, guidance_scale=4.5,
            use_resolution_binning=False)
  latents = np.random.default_rng(0).standard_normal((1, 16, 24, 8)).astype(np.float32)  # the tiny VAE is 4x
  torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want = ref(**kw, latents=torch_latents, output_type="np").images[0]
    theirs = diffusers.SanaPipeline.from_pretrained(tmp_path / "pipe")(
        **kw, latents=torch_latents, output_type="np").images[0]
  np.testing.assert_allclose(theirs, want, atol=1e-5)
  got = sana_jax.load_pipeline(tmp_path / "pipe")(**kw, latents=jnp.asarray(latents), output_type="np").images[0]
  assert np.abs(np.asarray(got) - want).max() < 1e-3


def test_pipeline_class_and_scheduler_follow_the_checkpoint(tmp_path, capsys, base_pipeline):
  """A Sprint checkpoint becomes a SanaSprintPipeline (sCM), a ControlNet one a SanaControlNetPipeline with
  both models; a 4K one samples with flow shift 6."""
  ref, base, heads = base_pipeline
  like_base = dict(in_channels=8, out_channels=8, caption_channels=32, cross_attention_dim=64, num_layers=2,
                   num_cross_attention_heads=2, cross_attention_head_dim=16)
  sprint = tiny_dit(guidance_embeds=True, qk_norm="rms_norm_across_heads", sample_size=32, **like_base)
  pth = save_pth(tmp_path / "sprint.pth", original_state(sprint, nvlabs.transformer_rows(guidance=True)))
  assert convert(capsys, pth, "--out", tmp_path / "sprint", "--config", heads, "--pipeline", base)[0] == 0
  index = json.loads((tmp_path / "sprint" / "model_index.json").read_text())
  assert index["_class_name"] == "SanaSprintPipeline" and index["scheduler"] == ["diffusers", "SCMScheduler"]
  assert sana_jax.load_pipeline(tmp_path / "sprint").transformer.config.guidance_embeds

  large = tiny_dit(sample_size=128, interpolation_scale=2.0, **like_base)
  pth = save_pth(tmp_path / "4k.pth", original_state(large, nvlabs.transformer_rows()))
  assert convert(capsys, pth, "--out", tmp_path / "4k", "--config", heads, "--pipeline", base)[0] == 0
  scheduler = json.loads((tmp_path / "4k" / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["flow_shift"] == 6.0
  assert json.loads((tmp_path / "4k" / "transformer" / "config.json").read_text())["interpolation_scale"] == 2.0

  control = diffusers.SanaControlNetModel(**{**like_base, **{k: ref.transformer.config[k] for k in HEADS},
                                             "num_layers": 1, "sample_size": 16})
  shift_off_init(control, seed=3)
  shared = {k: v for k, v in ref.transformer.state_dict().items() if k.startswith(("patch_embed", "time_embed",
                                                                                     "caption"))}
  control.load_state_dict(shared, strict=False)
  state = {**original_state(ref.transformer, nvlabs.transformer_rows(controlnet=True)),
           **original_state(control, nvlabs.controlnet_rows(), extras=False)}
  pth = save_pth(tmp_path / "cn.pth", state)
  assert convert(capsys, pth, "--out", tmp_path / "cn", "--config", heads, "--pipeline", base,
                 "--resolution", 512)[0] == 0
  loaded = diffusers.SanaControlNetPipeline.from_pretrained(tmp_path / "cn")
  for name, w in control.state_dict().items():
    assert torch.equal(loaded.controlnet.state_dict()[name], w), name
  for name, w in ref.transformer.state_dict().items():
    assert torch.equal(loaded.transformer.state_dict()[name], w), name
  assert type(sana_jax.load_pipeline(tmp_path / "cn")).__name__ == "SanaControlNetPipeline"


def test_pickle_that_runs_a_command_is_refused(tmp_path, capsys):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  torch.save({"state_dict": {"x_embedder.proj.weight": Exploit()}}, tmp_path / "evil.pth")
  status, out = convert(capsys, tmp_path / "evil.pth", "--out", tmp_path / "out", "--resolution", 1024)
  assert status == 2 and not marker.exists() and not (tmp_path / "out").exists()
  assert out.err.count("\n") == 1 and "system" in out.err and "Traceback" not in out.err


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_damaged_files_are_one_line_errors(tmp_path, capsys, damage):
  good = save_pth(tmp_path / "good.pth", original_state(tiny_dit(sample_size=32), nvlabs.transformer_rows()))
  bad = tmp_path / "bad.pth"
  data = good.read_bytes()
  bad.write_bytes({"truncated": data[:len(data) // 2], "text": b"not a checkpoint\n" * 10, "empty": b""}[damage])
  status, out = convert(capsys, bad, "--out", tmp_path / "out")
  assert status == 2 and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
  assert not (tmp_path / "out").exists()


def test_layout_errors_name_the_problem(tmp_path, capsys):
  ref = tiny_dit(sample_size=32)
  state = original_state(ref, nvlabs.transformer_rows())
  heads = write_heads(tmp_path)
  cases = {
      "not released": (state, [], "width 64 is not a released Sana size"),
      "unknown key": ({**state, "blocks.0.attn.extra.weight": torch.ones(2)}, ["--config", heads],
                      "unexpected key 'blocks.0.attn.extra.weight'"),
      "missing": ({k: v for k, v in state.items() if k != "blocks.1.mlp.point_conv.conv.weight"}, ["--config", heads],
                  "no weight for transformer_blocks.1.ff.conv_point.weight"),
      "no resolution": ({k: v for k, v in state.items() if k != "pos_embed"}, ["--config", heads],
                        "no pos_embed tells the checkpoint's resolution"),
      "odd resolution": (state, ["--config", heads, "--resolution", "768"], "resolution 768"),
  }
  for name, (case, args, message) in cases.items():
    pth = save_pth(tmp_path / "case.pth", case)
    status, out = convert(capsys, pth, "--out", tmp_path / "out", *args)
    assert status == 2 and message in out.err and out.err.count("\n") == 1, (name, out.err)
  assert not (tmp_path / "out").exists()


def test_released_sizes_are_inferred():
  """The widths, depths and resolutions of the released checkpoints (shapes only, no data)."""
  def shapes(width, depth, sprint=False, side=None):
    state = {"x_embedder.proj.weight": (width, 32, 1, 1), "final_layer.linear.weight": (32, width),
             "y_embedder.y_proj.fc1.weight": (width, 2304),
             "blocks.0.mlp.inverted_conv.conv.weight": (int(2.5 * width) * 2, width, 1, 1),
             **{f"blocks.{i}.scale_shift_table": (6, width) for i in range(depth)}}
    if sprint:
      state.update({"cfg_embedder.mlp.0.weight": (width, 256), "blocks.0.attn.q_norm.weight": (width,)})
    if side:
      state["pos_embed"] = (1, side * side, width)
    return {k: np.broadcast_to(np.float32(0), s) for k, s in state.items()}

  small = nvlabs.infer_config(shapes(1152, 28), resolution=1024)
  assert (small["num_attention_heads"], small["num_cross_attention_heads"], small["cross_attention_head_dim"],
          small["num_layers"], small["sample_size"], small["interpolation_scale"], small["mlp_ratio"]) == (
              36, 16, 72, 28, 32, None, 2.5)
  big_4k = nvlabs.infer_config(shapes(2240, 20, side=128))
  assert (big_4k["num_attention_heads"], big_4k["cross_attention_head_dim"], big_4k["sample_size"],
          big_4k["interpolation_scale"], big_4k["qk_norm"], big_4k["guidance_embeds"]) == (
              70, 112, 128, 2.0, None, False)
  sprint = nvlabs.infer_config(shapes(2240, 20, sprint=True), resolution=1024, config={"sample_size": 16})
  assert (sprint["qk_norm"], sprint["guidance_embeds"], sprint["sample_size"]) == ("rms_norm_across_heads", True, 16)
  assert nvlabs.infer_config(shapes(2240, 60, side=64))["interpolation_scale"] == 1.0  # 2K


def test_pre_merge_diffusers_configs(tmp_path):
  ref = tiny_dit(sample_size=16)
  ref.save_pretrained(tmp_path / "old")
  config = json.loads((tmp_path / "old" / "config.json").read_text())
  config.pop("interpolation_scale")
  config.update(expand_ratio=config.pop("mlp_ratio"), use_pe=False, caption_norm_scale_factor=0.1,
                ff_bias=[True, True, False], activation_fn=["silu", "silu", None], norm_type="ada_norm_single",
                use_caption_norm=True, ff_norm=[None, None, None], attention_type="default", upcast_attention=False,
                num_embeds_ada_norm=1000, norm_num_groups=32, use_additional_conditions=None)
  (tmp_path / "old" / "config.json").write_text(json.dumps(config))
  cfg = diffusers_dit.read_config(tmp_path / "old")[1]
  assert cfg.mlp_ratio == 2.5 and cfg.interpolation_scale is None
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path / "old")
  x, t, y, mask = odd_inputs(dict(ref.config), h=4, w=6)
  assert rel_err(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask)),
                 reference_forward(ref, x, t, y, mask)) < 1e-4
  for bad, message in ((dict(use_pe=True), "convert the original .pth"),
                       (dict(ff_bias=[True, True, True]), "ff_bias = [True, True, True]"),
                       (dict(expand_ratio=4.0, mlp_ratio=2.5), "disagree")):
    with pytest.raises(sana_jax.SanaError, match=re.escape(message)):
      diffusers_dit.upgrade_config({**config, **bad})


@pytest.mark.parametrize("args, message", [
    ([], "required: src, --out"),
    (["missing.pth", "--out", "O"], "checkpoint missing.pth does not exist"),
    (["{pth}", "--out", "O", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["{pth}", "--out", "{pth}"], "exists and is not a directory"),
])
def test_command_line_bad_arguments_exit_2(tmp_path, args, message):
  import subprocess
  import sys
  pth = tmp_path / "x.pth"
  pth.write_bytes(b"")
  out = subprocess.run([sys.executable, "-m", "sana_jax.convert", *(a.format(pth=pth) for a in args)],
                       capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
  assert pth.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["x.pth"]
