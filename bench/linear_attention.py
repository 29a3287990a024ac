"""Linear attention: the Pallas kernels vs the XLA reference, forward and forward+backward.

  python bench/linear_attention.py            # GPU/TPU: 0.6B (36 heads) and 1.6B (70 heads) shapes,
                                              # 1024 / 4096 / 16384 tokens, batch 2, bf16
  python bench/linear_attention.py --quick    # a small shape, to check the script runs (CPU: interpret mode)
  python bench/linear_attention.py --block 128  # tokens per kernel block (default: the kernel's plan)

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
from sana_jax.kernels.linear_attention import choose_implementation  # noqa: E402
from sana_jax.kernels.linear_attention_pallas import linear_attention_pallas  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM datasheet figures


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--block", type=int, default=None)
  args = p.parse_args()
  device = jax.devices()[0].device_kind
  peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in device), None)
  cases = [(36, 256)] if args.quick else [(h, n) for h in (36, 70) for n in (1024, 4096, 16384)]
  for heads, tokens in cases:
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (2, tokens, heads, 32)
    q, k = (jax.nn.relu(jax.random.normal(kk, shape, jnp.bfloat16)) for kk in keys[:2])
    v = jax.random.normal(keys[2], shape, jnp.bfloat16)
    fns = {}
    interpret = jax.default_backend() == "cpu"
    pallas = lambda q, k, v: linear_attention_pallas(q, k, v, block=args.block, interpret=interpret)
    for impl, attend in (("xla", linear_attention_reference), ("pallas", pallas)):
      fwd = jax.jit(attend)
      # value_and_grad: with grad alone the forward output is dead code and skipped
      grad = jax.jit(jax.value_and_grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v)), (0, 1, 2)))
      fns[f"{impl}_fwd"] = lambda f=fwd: jax.block_until_ready(f(q, k, v))
      fns[f"{impl}_fwd_bwd"] = lambda f=grad: jax.block_until_ready(f(q, k, v))
    times = time_alternating(fns, args.repeats)
    moved = 3 * q.size * 2 + q.size * 4
    record = dict(bench="linear_attention", heads=heads, tokens=tokens, batch=2, dtype="bfloat16", device=device,
                  commit=commit(), **{f"{name}_ms": round(t * 1e3, 3) for name, t in times.items()},
                  speedup_fwd=round(times["xla_fwd"] / times["pallas_fwd"], 2),
                  speedup_fwd_bwd=round(times["xla_fwd_bwd"] / times["pallas_fwd_bwd"], 2),
                  pallas_fwd_gb_s=round(moved / times["pallas_fwd"] / 1e9, 1),
                  block=args.block, auto=choose_implementation(shape, jnp.bfloat16))
    if peak:
      record["pallas_fwd_roofline"] = round(moved / times["pallas_fwd"] / peak, 3)
    emit(record)


if __name__ == "__main__":
  main()
