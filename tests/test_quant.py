"""Quantized inference (sana_jax.quant): the number formats round trip, each quantized layer computes
exactly its definition, quantized DiTs stay within error bounds of the float model (a tiny random
diffusers checkpoint), directories save and load bit for bit, and pipelines quantize, save, load and
sample on one device and on eight alike."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err
from test_controlnet import controlnet_pipelines  # noqa: F401 - a tiny ControlNet pipeline saved to disk
from test_pipeline import pipelines, run_cli  # noqa: F401 - the tiny diffusers pipeline saved to disk
from test_sprint import sprint  # noqa: F401 - a tiny Sana-Sprint pipeline saved to disk
from test_train import NEEDS_8

import sana_jax
from sana_jax import quant
from sana_jax.errors import SanaError
from sana_jax.quant import calibrate
from sana_jax.quant import layers as Q
from sana_jax.quant import model as quant_model
from sana_jax.quant import numerics as N


def dit_inputs(seed=0):
  """Non-square latents, non-integer timesteps, a padded caption: the tiny pipeline's DiT's inputs."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 6, 10, 8)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
  return x, jnp.asarray([300.5, 720.25]), text, mask


def calibrated(dit, seeds=(1, 2)):
  ranges = calibrate.Ranges(dit)
  for seed in seeds:
    ranges.observe(*dit_inputs(seed))
  return ranges.statistics()


@pytest.fixture(scope="module")
def dit(pipelines):  # noqa: F811
  return pipelines[1].transformer


# ---- formats


def test_int4_packing_round_trips_every_value():
  low, high = np.meshgrid(np.arange(-8, 8, dtype=np.int8), np.arange(-8, 8, dtype=np.int8))
  q = np.stack([low.ravel(), high.ravel()], axis=1).reshape(-1, 1)  # rows: every (low, high) nibble pair
  q = jnp.asarray(np.concatenate([q, q[::-1]], axis=1))
  packed = N.pack_int4(q)
  assert packed.dtype == jnp.uint8 and packed.shape == (q.shape[0] // 2, 2)
  np.testing.assert_array_equal(N.unpack_int4(packed), q)


def test_weight_formats_are_within_half_a_step():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((150, 2, 7)) * np.exp(rng.standard_normal((1, 2, 7))), jnp.float32)
  q, scale = N.int8_weight(w)
  assert q.dtype == jnp.int8 and scale.shape == (2, 7)
  assert np.all(np.abs(np.asarray(q, np.float32) * scale - w) <= scale / 2 * (1 + 1e-6))
  f, scale = N.fp8_weight(w)
  err = np.abs(np.asarray(f.astype(jnp.float32)) * scale - w)
  assert f.dtype == N.FP8 and np.all(err <= np.abs(w) / 16 + scale * 2.0**-10)  # 3 mantissa bits, subnormals
  packed, scale = N.int4_weight(w)  # 150 rows: padded to 3 groups of 64
  assert packed.shape == (96, 2, 7) and scale.shape == (3, 2, 7)
  restored = N.int4_dequantize(packed, scale, jnp.float32)
  assert np.all(np.asarray(restored[150:]) == 0)
  step = np.repeat(np.asarray(scale), 64, axis=0)[:150]
  assert np.all(np.abs(np.asarray(restored[:150]) - w) <= step / 2 * (1 + 1e-6))


AXES = ("layers", "embed", "heads")  # a block's projection, stacked over one layer


def first(stacked_layer):
  """Layer 0 of a layer built stacked (as the DiT's blocks are), as the scan over blocks sees it."""
  graphdef, state = nnx.split(stacked_layer)
  return nnx.merge(graphdef, jax.tree.map(lambda v: v[0], state))


def test_int8_layer_is_the_integer_product():
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.standard_normal((1, 40, 24)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((1, 24)), jnp.float32)
  layer = first(Q.Int8Dense(*jax.vmap(N.int8_weight)(kernel), bias, AXES, dtype=jnp.float32))
  x = rng.standard_normal((3, 5, 40)).astype(np.float32) * np.linspace(0.1, 10, 5)[:, None]
  got = layer(x)
  xs = np.max(np.abs(x), axis=-1, keepdims=True) / 127
  xq = np.clip(np.round(x / xs), -127, 127).astype(np.int64)
  wq, ws = np.asarray(layer.kernel[...], np.int64), np.asarray(layer.kernel_scale[...], np.float64)
  want = (xq @ wq) * xs * ws + np.asarray(bias[0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def svdquant_layer(kernel, amax):
  parts = quant_model._svdquant_layers(kernel[None], amax[None], quant_model.SMOOTHING_ALPHA)
  return first(Q.SVDQuantDense(*parts, None, AXES, dtype=jnp.float32))


def test_svdquant_layer_is_its_definition():
  """x / smooth through the low-rank branch plus int4(x / smooth) . int4 residual, the residual being what
  the branch leaves of the smoothed kernel; 100 input channels: padded to two groups."""
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.standard_normal((100, 48)), jnp.float32)
  amax = jnp.asarray(np.abs(rng.standard_normal(100)) * 5 + 0.1, jnp.float32)
  layer = svdquant_layer(kernel, amax)
  smooth, down, up = (np.asarray(p[...], np.float64) for p in (layer.smooth, layer.lora_down, layer.lora_up))
  residual = np.asarray(N.int4_dequantize(layer.kernel[...], layer.kernel_scale[...], jnp.float32), np.float64)
  assert down.shape == (100, 32) and up.shape == (32, 48) and residual.shape == (128, 48)
  smoothed = np.asarray(kernel, np.float64) * smooth[:, None]
  step = np.repeat(np.asarray(layer.kernel_scale[...]), 64, axis=0)[:100]
  assert np.all(np.abs(down @ up + residual[:100] - smoothed) <= step / 2 * (1 + 1e-5) + 1e-6)
  x = rng.standard_normal((4, 100)).astype(np.float32)
  xs = np.pad(x / smooth, [(0, 0), (0, 28)]).reshape(4, 2, 64)
  scale = np.max(np.abs(xs), axis=-1, keepdims=True) / 7
  x4 = (np.clip(np.round(xs / scale), -7, 7) * scale).reshape(4, 128)
  want = (x / smooth) @ down @ up + x4 @ residual
  np.testing.assert_allclose(layer(x), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothing_moves_an_outlier_channel_into_the_weights(seed):
  """Activations with two channels 40x the others: calibrated smoothing makes W4A4's error several times
  smaller than the same layer calibrated on flat statistics (which leaves the outliers to the int4 groups)."""
  rng = np.random.default_rng(seed)
  kernel = jnp.asarray(rng.standard_normal((128, 64)) / 10, jnp.float32)
  x = rng.standard_normal((256, 128)).astype(np.float32)
  x[:, [5, 77]] *= 40
  want = x @ np.asarray(kernel)
  err = lambda amax: rel_err(svdquant_layer(kernel, jnp.asarray(amax, jnp.float32))(x), want)
  assert err(np.abs(x).max(axis=0)) < 0.5 * err(np.ones(128))


# ---- the quantized DiT


@pytest.mark.parametrize("mode, bound", [("int8", 0.03), ("fp8", 0.1), ("w4a4", 0.3)])
def test_quantized_dit_within_bounds_of_the_float_model(dit, mode, bound):
  statistics = calibrated(dit) if mode == "w4a4" else None
  q = quant.quantize_transformer(dit, mode, statistics)
  assert quant.mode_of(q) == mode and quant.mode_of(dit) is None
  for name in quant.ACTIVATION_LAYERS + quant.WEIGHT_ONLY_LAYERS:
    assert type(quant_model.layer(q.blocks, name)).__name__ != "Dense", name
  x = dit_inputs(seed=5)
  err = rel_err(q(*x), dit(*x))
  assert 1e-4 < err < bound, err
  if mode != "w4a4":  # at width 64 a rank-32 branch is half a kernel: w4a4's saving shows at real widths (bench)
    assert quant.weight_bytes(q) < 0.6 * quant.weight_bytes(dit)


def test_quantizing_needs_a_known_mode_and_w4a4_statistics(dit):
  with pytest.raises(SanaError, match="expected one of int8, fp8, w4a4"):
    quant.quantize_transformer(dit, "int3")
  with pytest.raises(SanaError, match="needs calibration statistics"):
    quant.quantize_transformer(dit, "w4a4")
  with pytest.raises(SanaError, match="already quantized"):
    quant.quantize_transformer(quant.quantize_transformer(dit, "int8"), "fp8")


def test_fp8_on_an_older_gpu_is_a_clear_error():
  class Ampere:
    platform, device_kind, compute_capability = "gpu", "NVIDIA A100-SXM4-80GB", "8.0"

  class Hopper(Ampere):
    compute_capability = "9.0"

  with pytest.raises(SanaError, match="compute capability 8.9 or newer.*8.0: use int8"):
    quant.check_backend("fp8", Ampere())
  quant.check_backend("fp8", Hopper())
  quant.check_backend("int8", Ampere())


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_quantized_transformer_loads_bit_exact(dit, tmp_path, mode, dtype):
  dit = nnx.merge(*nnx.split(dit)) if dtype == "float32" else sana_jax.SanaTransformer.from_pretrained(
      dit_dir(dit, tmp_path), dtype=jnp.bfloat16)
  q = quant.quantize_transformer(dit, mode, calibrated(dit) if mode == "w4a4" else None)
  q.save_pretrained(tmp_path / "q", dtype=dtype)
  config = json.loads((tmp_path / "q" / "config.json").read_text())
  assert config["quantization_config"] == {"quant_method": "sana_jax", "mode": mode, "format_version": 1}
  back = sana_jax.SanaTransformer.from_pretrained(tmp_path / "q", dtype=dtype)
  assert quant.mode_of(back) == mode
  ours, theirs = jax.tree.leaves(nnx.state(q)), jax.tree.leaves(nnx.state(back))
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  x = dit_inputs()
  np.testing.assert_array_equal(back(*x), q(*x))


def dit_dir(dit, tmp_path):
  dit.save_pretrained(tmp_path / "float")
  return tmp_path / "float"


def test_damaged_quantized_directories_are_one_line_errors(dit, tmp_path):
  from sana_jax.convert import safetensors_io, writing
  quant.quantize_transformer(dit, "int8").save_pretrained(tmp_path / "q")
  config_path, weights_path = tmp_path / "q" / "config.json", tmp_path / "q" / "diffusion_pytorch_model.safetensors"
  config, weights = json.loads(config_path.read_text()), dict(safetensors_io.read_file(weights_path))

  def write(config, weights):
    config_path.write_text(json.dumps(config))
    weights_path.unlink()
    writing.save_safetensors(weights_path, weights, {"format": "pt"})

  write({**config, "quantization_config": {"quant_method": "bitsandbytes"}}, weights)
  with pytest.raises(SanaError, match="not one sana-jax can load"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path / "q")
  name = "blocks.attn1.to_q.kernel"
  write(config, {**weights, name: np.asarray(weights[name], np.float32)})
  with pytest.raises(SanaError, match=f"tensor {name} is float32, expected int8"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path / "q")
  write(config, {k: v for k, v in weights.items() if k != "blocks.ff.conv_point.kernel_scale"})
  with pytest.raises(SanaError, match="missing tensor"):
    sana_jax.SanaTransformer.from_pretrained(tmp_path / "q")


# ---- pipelines


def generate(pipe, side=32, n=2, output_type="np"):
  latents = np.random.default_rng(0).standard_normal((n, side // 4, side // 4, 8)).astype(np.float32)
  return np.asarray(pipe((["a red fox in the snow", "a blue house"] * n)[:n], height=side, width=side,
                         num_inference_steps=3, latents=latents, output_type=output_type,
                         use_resolution_binning=False).images)


def psnr(a, b):
  return 10 * np.log10(1 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.mark.slow
def test_pipeline_quantizes_saves_and_loads_without_calibrating(pipelines, tmp_path):  # noqa: F811
  reference = generate(pipelines[1])
  pipe = sana_jax.SanaPipeline.from_pretrained(pipelines[2])
  pipe.quantize("w4a4", calibration_prompts=["a red fox", "a blue house in the snow"], num_inference_steps=3)
  images = generate(pipe)
  assert 20 < psnr(images, reference) < 80
  pipe.save_pretrained(tmp_path / "w4a4")
  loaded = sana_jax.load_pipeline(tmp_path / "w4a4")
  assert quant.mode_of(loaded.transformer) == "w4a4"
  np.testing.assert_array_equal(generate(loaded), images)
  with pytest.raises(SanaError, match="LoRA on a w4a4 transformer"):
    loaded.load_lora_weights({})
  with pytest.raises(SanaError, match=r"already quantized \(w4a4\)"):
    loaded.quantize("int8")


@NEEDS_8
@pytest.mark.slow
@pytest.mark.parametrize("mode, parallelism", [("int8", "sequence"), ("w4a4", "cfg")])
def test_quantized_sampling_on_8_devices_equals_one(pipelines, tmp_path, mode, parallelism):  # noqa: F811
  """The same quantized model split over 8 devices: its latents differ from one device's only by activations
  that round to the other neighbouring integer (the float model's split sums differ in the last bits), far
  less than quantizing changes them."""
  one = sana_jax.SanaPipeline.from_pretrained(pipelines[2], devices=1)
  float_latents = generate(one, 128, 1, "latent")
  one.quantize(mode, calibration_prompts=["a red fox"], num_inference_steps=2)
  one.save_pretrained(tmp_path / mode)
  eight = sana_jax.SanaPipeline.from_pretrained(tmp_path / mode, parallelism=parallelism)
  assert eight.sampling_plan((1, 32, 32, 8), groups=2) == ((1, 8) if parallelism == "sequence" else (2, 4))
  ours = generate(one, 128, 1, "latent")
  split, quantizing = rel_err(generate(eight, 128, 1, "latent"), ours), rel_err(ours, float_latents)
  assert split < 0.2 * quantizing, (split, quantizing)


@pytest.mark.slow
def test_cli_quantizes_and_samples_a_saved_quantized_directory(pipelines, tmp_path):  # noqa: F811
  from PIL import Image
  args = ("--height", 32, "--width", 32, "--steps", 2, "--dtype", "float32")
  r = run_cli("a red fox", "--model", pipelines[2], "--quantize", "int8", *args, "--output-dir", tmp_path / "a",
              cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert Image.open(tmp_path / "a" / "0000.png").text["quantize"] == "int8"
  sana_jax.SanaPipeline.from_pretrained(pipelines[2]).quantize("int8").save_pretrained(tmp_path / "int8")
  r = run_cli("a red fox", "--model", tmp_path / "int8", *args, "--output-dir", tmp_path / "b", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  same = lambda name: np.asarray(Image.open(tmp_path / name / "0000.png"))
  np.testing.assert_array_equal(same("a"), same("b"))  # quantized here or loaded quantized: the same image


@pytest.mark.slow
def test_sprint_and_controlnet_pipelines_quantize(sprint, controlnet_pipelines, tmp_path):  # noqa: F811
  """Sprint quantizes to int8 (w4a4's calibration needs a Flow sampler: a clear error); a ControlNet pipeline
  quantizes its transformer, keeps the ControlNet float, and saves and loads as it samples."""
  pipe = sana_jax.load_pipeline(sprint[2])
  with pytest.raises(SanaError, match="SanaSprintPipeline has neither"):
    pipe.quantize("w4a4")
  kw = dict(height=32, width=32, seed=0, output_type="np")  # the same initial and per-step noise
  before = np.asarray(pipe("a red fox", **kw).images)
  after = np.asarray(pipe.quantize("int8")("a red fox", **kw).images)
  assert 25 < psnr(after, before) < 80
  pipe = sana_jax.load_pipeline(controlnet_pipelines[1]).quantize("int8")
  assert quant.mode_of(pipe.transformer) == "int8" and quant.mode_of(pipe.controlnet) is None
  kw = dict(height=64, width=96, num_inference_steps=2, control_image=np.full((1, 64, 96, 3), 0.5, np.float32),
            latents=np.ones((1, 16, 24, 8), np.float32), output_type="np", use_resolution_binning=False)
  images = np.asarray(pipe("a red circle", **kw).images)
  pipe.save_pretrained(tmp_path / "controlnet")
  loaded = sana_jax.load_pipeline(tmp_path / "controlnet")
  np.testing.assert_array_equal(np.asarray(loaded("a red circle", **kw).images), images)


def test_cli_calibration_prompts_without_w4a4_is_one_line_exit_2(pipelines, tmp_path):  # noqa: F811
  r = run_cli("a red fox", "--model", pipelines[2], "--quantize", "int8", "--calibration-prompts", "x",
              "--output-dir", tmp_path / "out", cwd=tmp_path)
  assert r.returncode == 2 and "is for --quantize w4a4" in r.stderr and r.stderr.count("\n") == 1, r.stderr
  assert not (tmp_path / "out").exists()


def test_library_never_imports_torch_for_quantization():
  code = "import sys, sana_jax.quant, sana_jax.quant.saving, sana_jax.quant.calibrate; print('torch' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
