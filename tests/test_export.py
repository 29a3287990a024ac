"""Exporting our models to the official formats: reference model -> ours -> export, and the reference
library (and our loader) read the export back bit for bit."""
import dataclasses
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx, traverse_util
from reference import byte_bpe_tokenizer, save_tiny_sana_pipeline
from test_dcae_parity import CONFIGS as DCAE_CONFIGS
from test_dcae_parity import make_reference as make_dcae
from test_dit_parity import make_reference as make_dit
from test_gemma_parity import make_reference as make_gemma

import sana_jax
from sana_jax.convert import (
  diffusers_dcae,
  diffusers_dit,
  invert,
  pipelines,
  safetensors_io,
  table,
  transformers_gemma,
  writing,
)
from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION


def params(model):
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  return {k: np.asarray(v) for k, v in flat.items()}


def assert_same_params(a, b):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def assert_same_state_dict(got, expected):
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def public(config):
  """A diffusers config without its `_` metadata, as JSON would give it back (tuples -> lists)."""
  return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


DIT_CASES = {
    "qknorm_bias_affine_patch2_sincos": dict(qk_norm="rms_norm_across_heads", attention_bias=True,
                                             norm_elementwise_affine=True, patch_size=2, interpolation_scale=2.0,
                                             sample_size=12),
    "sprint_guidance_tscale": dict(guidance_embeds=True, timestep_scale=1000.0, qk_norm="rms_norm_across_heads"),
}


def assert_round_trip(tmp_path, ref, ours_cls, ref_cls):
  """Ours loads the reference directory tmp_path/ref and saves it to tmp_path/out; the reference
  library loads that back with the same weights and config, and so do we."""
  ours = ours_cls.from_pretrained(tmp_path / "ref")
  ours.save_pretrained(tmp_path / "out")
  back = ref_cls.from_pretrained(tmp_path / "out")
  assert_same_state_dict(back.state_dict(), ref.state_dict())
  assert public(back.config) == public(ref.config)
  again = ours_cls.from_pretrained(tmp_path / "out")
  assert again.config == ours.config
  assert_same_params(again, ours)


@pytest.mark.parametrize("case", sorted(DIT_CASES))
def test_transformer_export_loads_back_exactly(tmp_path, case):
  ref = make_dit(tmp_path / "ref", **DIT_CASES[case])
  assert_round_trip(tmp_path, ref, sana_jax.SanaTransformer, diffusers.SanaTransformer2DModel)


@pytest.mark.parametrize("name", sorted(DCAE_CONFIGS))
def test_vae_export_loads_back_exactly(tmp_path, name):
  ref = make_dcae(tmp_path / "ref", DCAE_CONFIGS[name])  # batch-norm statistics moved off init too
  assert_round_trip(tmp_path, ref, sana_jax.DCAE, diffusers.AutoencoderDC)


@pytest.mark.parametrize("causal_lm", [False, True], ids=["Gemma2Model", "Gemma2ForCausalLM"])
def test_gemma_export_loads_back_exactly(tmp_path, causal_lm):
  overrides = dict(attention_bias=True, sliding_window=4, attn_logit_softcapping=None, rope_theta=500.0,
                   layer_types=["full_attention", "sliding_attention", "full_attention"])
  ref = make_gemma(tmp_path / "ref", causal_lm=causal_lm, **overrides)
  ours = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path / "ref")
  ours.save_pretrained(tmp_path / "out")
  back = transformers.Gemma2Model.from_pretrained(tmp_path / "out")
  assert_same_state_dict(back.state_dict(), (ref.model if causal_lm else ref).state_dict())
  from_config = lambda c: sana_jax.GemmaConfig.from_transformers(c.to_dict())
  assert from_config(back.config) == from_config(ref.config)
  again = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path / "out")
  assert again.config == ours.config
  assert_same_params(again, ours)


def random_model(cls, cfg, seed=0):
  """cls(cfg) with random normal weights, built abstractly (eager init of a DC-AE takes seconds)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  fill = lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype))
  nnx.replace_by_pure_dict(state, jax.tree.map(fill, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def test_models_built_here_round_trip(tmp_path):
  """Models made from our own configs (as training makes them): config and weights come back as
  they were; the runtime-only DiT fields come back as their defaults."""
  from test_dit_parity import TINY
  dit_cfg = sana_jax.SanaTransformerConfig.from_dict(
      {**TINY, "qk_norm": "rms_norm_across_heads", "remat": "full", "scan_unroll": 1, "linear_attention_eps": 1e-8})
  gemma_cfg = sana_jax.GemmaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=16, sliding_window=4)
  dcae_cfg = sana_jax.DCAEConfig.from_dict(DCAE_CONFIGS["unshuffle_multiscale_rms"])
  runtime_defaults = {k: getattr(sana_jax.SanaTransformerConfig(), k) for k in diffusers_dit.OURS_ONLY}
  for cls, cfg, expected in [
      (sana_jax.SanaTransformer, dit_cfg, dataclasses.replace(dit_cfg, **runtime_defaults)),
      (sana_jax.GemmaTextEncoder, gemma_cfg, gemma_cfg), (sana_jax.DCAE, dcae_cfg, dcae_cfg)]:
    model = random_model(cls, cfg)
    model.save_pretrained(tmp_path / cls.__name__)
    again = cls.from_pretrained(tmp_path / cls.__name__)
    assert again.config == expected
    assert_same_params(again, model)


def test_bfloat16_sharded_export(tmp_path):
  """bf16 weights in several shards with an index: diffusers and our loader read the same values."""
  ref = make_dit(tmp_path / "ref")
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path / "ref")
  ours.save_pretrained(tmp_path / "out", "bfloat16", max_shard_bytes=20_000)
  with open(tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json") as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) > 2 and shards == {p.name for p in (tmp_path / "out").glob("*.safetensors")}
  stored = safetensors_io.read_dir(tmp_path / "out", "diffusion_pytorch_model")
  assert {a.dtype for a in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
  back = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
  assert_same_state_dict(back.state_dict(), {k: v.bfloat16() for k, v in ref.state_dict().items()})
  again = sana_jax.SanaTransformer.from_pretrained(tmp_path / "out", dtype=jnp.float32)
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params(ours).items()}
  assert all(np.array_equal(v, rounded[k]) for k, v in params(again).items())


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS")
def test_sharded_model_exports_the_same_weights(tmp_path):
  from sana_jax import parallel
  make_gemma(tmp_path, sliding_window=4)
  single = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path)
  sharded = sana_jax.GemmaTextEncoder.from_pretrained(tmp_path, mesh=parallel.make_mesh(data=1, fsdp=4, tensor=2))
  assert len(sharded.layers.mlp.down_proj.kernel[...].sharding.device_set) == 8
  a, b = writing.state_dict(single), writing.state_dict(sharded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_float16_overflow_is_a_user_error(tmp_path):
  make_dit(tmp_path / "ref")
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path / "ref")
  ours.scale_shift_table[...] = ours.scale_shift_table[...].at[0, 0].set(1e6)
  with pytest.raises(sana_jax.SanaError, match="scale_shift_table overflows float16"):
    ours.save_pretrained(tmp_path / "out", "float16")
  assert not (tmp_path / "out").exists()


def test_failed_save_leaves_previous_directory_whole(tmp_path, monkeypatch):
  from sana_jax.convert import safetensors_io
  make_dit(tmp_path / "ref")
  ours = sana_jax.SanaTransformer.from_pretrained(tmp_path / "ref")
  ours.save_pretrained(tmp_path / "out")
  before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors_io, "write_file", crash)
  with pytest.raises(OSError, match="disk full"):
    ours.save_pretrained(tmp_path / "out", "bfloat16")
  assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
  assert sorted(os.listdir(tmp_path)) == ["out", "ref"]  # no temporary directory left behind
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  with pytest.raises(sana_jax.SanaError, match="holds no saved model"):
    ours.save_pretrained(tmp_path / "notes")


def test_every_loader_transform_has_an_inverse():
  tables = (diffusers_dit.TABLE, diffusers_dcae.TABLE, transformers_gemma.TABLE)
  transforms = {t for rules in tables for _, target, t in rules if target is not None}
  rng = np.random.default_rng(0)
  cfg = sana_jax.SanaTransformerConfig(patch_size=2)
  shapes = {"conv1x1": (6, 5), "conv_oihw": (3, 3, 4, 5), "depthwise": (3, 3, 4), "glu_expand": (5, 2, 3),
            "glu_depthwise": (3, 3, 2, 4), "split_two": (2, 3), "adaln_kernel": (4, 6, 4), "six": (6, 4),
            "grouped_1x1": (3, 4, 4), "linear": (3, 5), "identity": (3,), "patch_conv": (2 * 2 * 3, 5)}
  assert {t.name for t in transforms} == set(shapes)
  for t in transforms:
    x = rng.standard_normal(shapes[t.name])
    assert np.array_equal(t.forward(t.inverse(x, cfg)), x), t.name


def test_drifted_table_is_caught_at_export(tmp_path):
  """A rule whose name or transform no longer round-trips fails the export, naming the key."""
  make_gemma(tmp_path, sliding_window=4)
  state = invert.flat_state(sana_jax.GemmaTextEncoder.from_pretrained(tmp_path))
  rules = transformers_gemma.TABLE
  entries = invert.plan(state, rules, optional={r"model\.": False})
  invert.check_names(entries, rules)
  swapped = [(p, t, table.IDENTITY if "mlp" in p else tr) for p, t, tr in rules]  # loader stops transposing
  with pytest.raises(sana_jax.SanaError, match=r"mlp\.\w+_proj\.weight' would load through identity"):
    invert.check_names(entries, swapped)
  renamed = [(p.replace("(gate|up|down)", "(gate|up|down_projection)"), t, tr) for p, t, tr in rules]
  with pytest.raises(sana_jax.SanaError, match=r"layers\.0\.mlp\.down_proj\.weight' matches 0 loader rules"):
    invert.check_names(entries, renamed)
  with pytest.raises(ValueError, match="optional group"):
    invert.plan(state, rules)  # "model." prefix or not: the exporter must be told


def test_scheduler_configs_match_diffusers():
  dpm = pipelines.scheduler_config("DPMSolverMultistepScheduler", flow_shift=4.0)
  euler = pipelines.scheduler_config("FlowMatchEulerDiscreteScheduler", flow_shift=6.0)
  refs = {"DPMSolverMultistepScheduler": diffusers.DPMSolverMultistepScheduler(
              flow_shift=4.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
          "FlowMatchEulerDiscreteScheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=6.0)}
  for ours in (dpm, euler):
    ref = refs[ours["_class_name"]]
    assert set(public(ours)) <= set(public(ref.config))  # nothing diffusers would not know
    assert public(type(ref).from_config(ours).config) == public(ref.config)
  with pytest.raises(sana_jax.SanaError, match="scheduler"):
    pipelines.scheduler_config("DDIMScheduler")


def tiny_pipeline(root):
  tok = byte_bpe_tokenizer(list(COMPLEX_HUMAN_INSTRUCTION) + ["a red fox in the snow"], 400)
  return save_tiny_sana_pipeline(root, tok)


def test_saved_pipeline_loads_in_diffusers_and_ours(tmp_path):
  ref = tiny_pipeline(tmp_path / "ref")
  ours = sana_jax.SanaPipeline.from_pretrained(tmp_path / "ref")
  kw = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="latent")
  before = np.asarray(ours("a red fox", **kw).images)
  pipelines.save_pipeline(tmp_path / "out", transformer=ours.transformer, vae=ours.vae, text_encoder=ours.text_encoder,
                          tokenizer=tmp_path / "ref", scheduler="DPMSolverMultistepScheduler", flow_shift=3.0)

  theirs = diffusers.SanaPipeline.from_pretrained(tmp_path / "out")
  for name in ("transformer", "vae", "text_encoder"):
    assert_same_state_dict(getattr(theirs, name).state_dict(), getattr(ref, name).state_dict())
  assert public(theirs.scheduler.config) == public(ref.scheduler.config)
  assert theirs.tokenizer("a red fox").input_ids == ref.tokenizer("a red fox").input_ids
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32))
  run = lambda pipe: pipe("a red fox", height=32, width=32, num_inference_steps=2, latents=latents,
                          output_type="latent", use_resolution_binning=False).images
  with torch.no_grad():
    assert torch.equal(run(theirs), run(ref))

  after = np.asarray(sana_jax.SanaPipeline.from_pretrained(tmp_path / "out")("a red fox", **kw).images)
  np.testing.assert_array_equal(after, before)

  # a tokenizer object, the Euler scheduler and bf16 weights: both libraries read the choices back
  pipelines.save_pipeline(tmp_path / "euler", transformer=ours.transformer, vae=ours.vae,
                          text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                          scheduler="FlowMatchEulerDiscreteScheduler", flow_shift=4.0, dtype="bfloat16")
  theirs = diffusers.SanaPipeline.from_pretrained(tmp_path / "euler", torch_dtype=torch.bfloat16)
  assert isinstance(theirs.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
  assert theirs.scheduler.config.shift == 4.0 and theirs.transformer.dtype == torch.bfloat16
  assert theirs.tokenizer("a red fox").input_ids == ref.tokenizer("a red fox").input_ids
  parts = sana_jax.SanaPipeline.components_from_pretrained(tmp_path / "euler", transformer=False)
  assert (parts["sampler"], parts["flow_shift"]) == ("flow_euler", 4.0)


def test_pipeline_save_pretrained_round_trips(tmp_path):
  tiny_pipeline(tmp_path / "ref")
  ours = sana_jax.SanaPipeline.from_pretrained(tmp_path / "ref")
  kw = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="latent")
  ours.save_pretrained(tmp_path / "out")
  again = sana_jax.SanaPipeline.from_pretrained(tmp_path / "out")
  assert again.sampler == ours.sampler and again.flow_shift == ours.flow_shift
  np.testing.assert_array_equal(np.asarray(again("a red fox", **kw).images), np.asarray(ours("a red fox", **kw).images))
  with open(tmp_path / "out" / "model_index.json") as f:
    assert "sana_jax" not in json.load(f)  # official settings: nothing extra written

  # prompt settings of our own (the demo model: no CHI, short captions) travel with the directory
  # and so does its own default guidance scale
  short = sana_jax.SanaPipeline.from_pretrained(tmp_path / "ref", max_sequence_length=8, complex_human_instruction=(),
                                                guidance_scale=3.0)
  short.save_pretrained(tmp_path / "short")
  loaded = sana_jax.SanaPipeline.from_pretrained(tmp_path / "short")
  assert loaded.text_settings == dict(max_sequence_length=8, complex_human_instruction=())
  assert loaded.guidance_scale == 3.0 and ours.guidance_scale == 4.5
  with open(tmp_path / "short" / "model_index.json") as f:
    assert json.load(f)["sana_jax"] == dict(max_sequence_length=8, complex_human_instruction=[], guidance_scale=3.0)
  y, mask, _, _ = loaded.encode_prompt("a red fox")
  assert y.shape[1] == 8 and np.array_equal(y, short.encode_prompt("a red fox")[0])
  assert not np.array_equal(y, ours.encode_prompt("a red fox")[0][:, :8])
  assert isinstance(diffusers.SanaPipeline.from_pretrained(tmp_path / "short"), diffusers.SanaPipeline)
