"""Quantized DiT (sana_jax.quant): weight memory, speed and quality against the 16-bit / float model.

  python bench/quantization.py --memory             # weight bytes of Sana 0.6B and 1.6B (abstract: no weights made)
  python bench/quantization.py --speed              # CPU: medium config (width 384, 4 layers, 32x32, batch 2)
  python bench/quantization.py --speed --preset gpu # GPU: Sana 1.6B at 1024 px, batch 1 and 8, bf16 / int8 / fp8 / w4a4
  python bench/quantization.py --quality            # relative DiT error (random models, the demo model), demo PSNR

Prints one JSON line per case. Every mode runs the same weights as the float model it is compared with.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit, time_alternating  # noqa: E402
from bench.dit_forward import MEDIUM, SANA, TEXT_LEN  # noqa: E402
from sana_jax import quant  # noqa: E402
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig  # noqa: E402
from sana_jax.quant import calibrate  # noqa: E402
from sana_jax.quant import model as quant_model  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sana_jax", "assets", "sana-shapes")


def sana_config(name):
  return SanaTransformerConfig(**{**MEDIUM, "caption_channels": 2304, **SANA[name]})


def memory():
  for name in SANA:
    build = lambda: SanaTransformer(sana_config(name), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    base = quant.weight_bytes(nnx.eval_shape(build))
    for mode in quant.MODES:
      q = quant.weight_bytes(quant_model.abstract_quantized(build, mode))
      emit(dict(bench="quant_memory", model=name, mode=mode, bf16_gib=round(base / 2**30, 3),
                quantized_gib=round(q / 2**30, 3), smaller=round(base / q, 2), commit=commit()))


def runtime_memory():
  """Compiled forward of the medium config in bfloat16: weight bytes it reads and scratch it needs (XLA's
  memory analysis): whether quantized weights stay small while they run, rather than being widened whole."""
  cfg = SanaTransformerConfig(**MEDIUM)
  model = random_model(cfg, jnp.bfloat16)
  call = inputs(cfg, 2, 32, jnp.bfloat16)
  for mode, m in variants(model, [call]).items():
    graphdef, state = nnx.split(m)
    compiled = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a)).lower(state, *call).compile()
    stats = compiled.memory_analysis()
    emit(dict(bench="quant_runtime_memory", model="medium", dtype="bfloat16", mode=mode,
              weight_mib=round(quant.weight_bytes(m) / 2**20, 2), temp_mib=round(stats.temp_size_in_bytes / 2**20, 2),
              commit=commit()))


def random_model(cfg, dtype, seed=0):
  """A float model with every weight moved off its init (zero layers included), as a trained one would be."""
  model = SanaTransformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype)
  state = nnx.state(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  moved = [(a.astype(jnp.float32) + 0.02 * jax.random.normal(k, a.shape)).astype(a.dtype) for a, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, moved))
  return model


def inputs(cfg, batch, side, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, side, side, cfg.in_channels)), dtype)
  text = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, cfg.caption_channels)), dtype)
  mask = jnp.asarray(np.arange(TEXT_LEN)[None] < rng.integers(20, TEXT_LEN, (batch, 1)), jnp.int32)
  return x, jnp.full((batch,), 500.0), text, mask


def variants(model, calls):
  """{mode: model}: the float model and each quantized one (w4a4 calibrated on `calls`)."""
  ranges = calibrate.Ranges(model)
  for call in calls:
    ranges.observe(*call)
  out = {"float": model}
  for mode in quant.MODES:
    out[mode] = quant.quantize_transformer(model, mode, ranges.statistics() if mode == "w4a4" else None)
  return out


def forward(model):
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
  return lambda *a: run(state, *a)


def speed(preset, repeats):
  if preset == "gpu":
    cases = [("sana_1600m", sana_config("sana_1600m"), 32, batch, jnp.bfloat16) for batch in (1, 8)]
  else:
    cases = [("medium", SanaTransformerConfig(**MEDIUM), 32, 2, jnp.float32)]
  for name, cfg, side, batch, dtype in cases:
    model = random_model(cfg, dtype)
    call = inputs(cfg, batch, side, dtype)
    models = variants(model, [call])
    fns = {mode: _timed(forward(m), call) for mode, m in models.items()}
    times = time_alternating(fns, repeats)
    for mode, t in times.items():
      emit(dict(bench="quant_speed", model=name, batch=batch, tokens=side * side, dtype=jnp.dtype(dtype).name,
                mode=mode, ms=round(t * 1e3, 2), speedup=round(times["float"] / t, 3),
                device=jax.devices()[0].device_kind, commit=commit()))


def _timed(fn, call):
  return lambda: fn(*call).block_until_ready()


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quality(prompts, seeds):
  for seed in range(seeds):  # random models: the medium config
    cfg = SanaTransformerConfig(**MEDIUM)
    model = random_model(cfg, jnp.float32, seed)
    calib, test = inputs(cfg, 2, 32, jnp.float32, seed), inputs(cfg, 2, 32, jnp.float32, seed + 100)
    ref = model(*test)
    for mode, m in variants(model, [calib]).items():
      if mode != "float":
        emit(dict(bench="quant_error", model="medium_random", seed=seed, mode=mode,
                  rel_err=round(rel_err(m(*test), ref), 4), commit=commit()))
  demo_quality(prompts)


def demo_quality(n):
  """The demo model: DiT error on its own sampling inputs, and PSNR of the images against the float model's."""
  from sana_jax.demo import evaluate
  from sana_jax.pipeline import load_pipeline
  prompts = [p["prompt"] for p in evaluate.make_prompt_set(2024, n)]
  calibration = [p["prompt"] for p in evaluate.make_prompt_set(evaluate.CALIBRATION_SEED, 32)]
  pipe = load_pipeline(DEMO)
  images = lambda pipe: np.asarray(pipe(prompts, seed=0, output_type="np").images, np.float64)
  reference = images(pipe)
  embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts[:8])
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, pipe.transformer.config.in_channels))
  call = (x, jnp.full((16,), 700.0), jnp.concatenate([neg, embeds]), jnp.concatenate([neg_mask, mask]))
  ref_out = pipe.transformer(*call)
  for mode in quant.MODES:
    q = load_pipeline(DEMO).quantize(mode, calibration_prompts=calibration)
    mse = np.mean((images(q) - reference) ** 2, axis=(1, 2, 3))  # per image
    psnr = lambda mse: round(float(10 * np.log10(1 / mse)), 2)
    emit(dict(bench="quant_demo", mode=mode, prompts=n, dit_rel_err=round(rel_err(q.transformer(*call), ref_out), 4),
              image_psnr_db=psnr(np.mean(mse)), median_image_psnr_db=psnr(np.median(mse)),
              worst_image_psnr_db=psnr(np.max(mse)), commit=commit()))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--memory", action="store_true")
  p.add_argument("--speed", action="store_true")
  p.add_argument("--quality", action="store_true")
  p.add_argument("--preset", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--prompts", type=int, default=64, help="--quality: demo prompts for the image PSNR")
  p.add_argument("--seeds", type=int, default=3, help="--quality: random medium models")
  args = p.parse_args()
  if not (args.memory or args.speed or args.quality):
    p.error("give --memory, --speed and/or --quality")
  if args.memory:
    memory()
    runtime_memory()
  if args.speed:
    speed(args.preset, args.repeats)
  if args.quality:
    quality(args.prompts, args.seeds)


if __name__ == "__main__":
  main()
