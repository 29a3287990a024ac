"""Linear attention: the Pallas kernels vs the XLA reference, forward and forward+backward.

  python bench/linear_attention.py            # GPU/TPU: 0.6B (36 heads) and 1.6B (70 heads) shapes,
                                              # 1024 / 4096 / 16384 tokens, batch 2, bf16
  python bench/linear_attention.py --quick    # a small shape, to check the script runs (CPU: interpret mode)
  python bench/linear_attention.py --block 128  # tokens per kernel block (default: the kernel's plan)
  python bench/linear_attention.py --check    # GPU: kernel vs reference on ragged shapes, fwd and grads
  python bench/linear_attention.py --sweep    # GPU: block / warps / chunk variants at 16384 tokens

"auto" in the record is what implementation="auto" picks for the shape on this device (it times
both itself; always "xla" on CPU).

Bandwidth counts the bytes the forward must move at least: q, k, v read once and the float32 output
written once (the K^T V sums are tiny); the roofline share divides by the device's HBM bandwidth.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit, time_alternating  # noqa: E402
from sana_jax.kernels import linear_attention_reference  # noqa: E402
from sana_jax.kernels.linear_attention import choose_implementation, timed_calls  # noqa: E402
from sana_jax.kernels.linear_attention_gpu import linear_attention_gpu, make_gpu_plan  # noqa: E402
from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM datasheet figures
INNER = 10  # calls queued per timing: launch gaps overlap, as in a model


def inputs(heads, tokens, dtype=jnp.bfloat16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (2, tokens, heads, 32)
  q, k = (jax.nn.relu(jax.random.normal(kk, shape, jnp.float32)).astype(dtype) for kk in keys[:2])
  return q, k, jax.random.normal(keys[2], shape, jnp.float32).astype(dtype)


def timed(attend, q, k, v):
  """(forward, forward+backward) callables running INNER calls each."""
  return timed_calls(attend, q, k, v, INNER)


def rel(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check():
  """The kernel against the reference on the device: odd lengths, several head counts, both dtypes."""
  worst = 0.0
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-3)):  # bf16: grads are rounded to bf16
    for heads, tokens in ((1, 17), (3, 1000), (36, 4099), (70, 1024)):
      q, k, v = inputs(heads, tokens, dtype, seed=tokens)
      g = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
      out, vjp = jax.vjp(jax.jit(linear_attention_pallas), q, k, v)
      ref32 = lambda q, k, v: linear_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                         v.astype(jnp.float32))
      want, vjp_ref = jax.vjp(jax.jit(ref32), q, k, v)
      errs = [rel(out, want)] + [rel(a, b) for a, b in zip(vjp(g), vjp_ref(g))]
      ok = all(e <= tol for e in errs) and all(bool(jnp.isfinite(x).all()) for x in (out, *vjp(g)))
      worst = max(worst, *errs)
      emit(dict(bench="linear_attention_check", dtype=jnp.dtype(dtype).name, heads=heads, tokens=tokens,
                fwd_rel=errs[0], dq_rel=errs[1], dk_rel=errs[2], dv_rel=errs[3], ok=ok))
  return worst


def sweep(repeats):
  """GPU kernel variants at 16384 tokens, each beside the XLA reference."""
  for heads in (36, 70):
    q, k, v = inputs(heads, 16384)
    fns = {}
    fns["xla_fwd"], fns["xla_fwd_bwd"] = timed(linear_attention_reference, q, k, v)
    default = make_gpu_plan(q.shape).chunk_blocks * 128  # tokens per reduction program
    variants = [(64, 4, 1), (128, 4, 1), (256, 4, 1), (128, 8, 1), (256, 8, 1), (128, 4, 4), (64, 4, 4)]
    for block, warps, longer in variants:  # longer: that many times the default tokens per reduction
      chunk = max(1, default * longer // block)
      attend = lambda q, k, v, b=block, w=warps, c=chunk: linear_attention_gpu(q, k, v, block=b, num_warps=w,
                                                                              chunk_blocks=c)
      name = f"b{block}_w{warps}_c{chunk}"
      fns[f"{name}_fwd"], fns[f"{name}_fwd_bwd"] = timed(attend, q, k, v)
    try:
      times = time_alternating(fns, repeats)
    except Exception as e:  # noqa: BLE001 - report, keep the other shape
      emit(dict(bench="linear_attention_sweep", heads=heads, error=str(e)[:500]))
      continue
    for name, t in sorted(times.items(), key=lambda kv: kv[1]):
      emit(dict(bench="linear_attention_sweep", heads=heads, tokens=16384, variant=name, ms=round(t / INNER * 1e3, 4)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--block", type=int, default=None)
  p.add_argument("--check", action="store_true")
  p.add_argument("--sweep", action="store_true")
  args = p.parse_args()
  device = jax.devices()[0].device_kind
  peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in device), None)
  cases = [(36, 256)] if args.quick else [(h, n) for h in (36, 70) for n in (1024, 4096, 16384)]
  if args.check:
    print(f"worst relative error: {check():.2e}")
    return
  if args.sweep:
    sweep(args.repeats)
    return
  for heads, tokens in cases:
    q, k, v = inputs(heads, tokens)
    shape = q.shape
    fns = {}
    interpret = jax.default_backend() == "cpu"
    pallas = lambda q, k, v: linear_attention_pallas(q, k, v, block=args.block, interpret=interpret)
    for impl, attend in (("xla", linear_attention_reference), ("pallas", pallas)):
      fns[f"{impl}_fwd"], fns[f"{impl}_fwd_bwd"] = timed(attend, q, k, v)
    times = time_alternating(fns, args.repeats)
    moved = 3 * q.size * 2 + q.size * 4
    record = dict(bench="linear_attention", heads=heads, tokens=tokens, batch=2, dtype="bfloat16", device=device,
                  commit=commit(), **{f"{name}_ms": round(t / INNER * 1e3, 4) for name, t in times.items()},
                  speedup_fwd=round(times["xla_fwd"] / times["pallas_fwd"], 2),
                  speedup_fwd_bwd=round(times["xla_fwd_bwd"] / times["pallas_fwd_bwd"], 2),
                  pallas_fwd_gb_s=round(moved / (times["pallas_fwd"] / INNER) / 1e9, 1),
                  block=args.block, auto=choose_implementation(shape, jnp.bfloat16))
    if peak:
      record["pallas_fwd_roofline"] = round(moved / (times["pallas_fwd"] / INNER) / peak, 3)
    emit(record)


if __name__ == "__main__":
  main()
