"""Times candidate implementations of the DiT's non-GEMM parts at Sana 0.6B shapes (bf16).

  python bench/dit_parts.py [--batch 8 --res 1024]

Used to choose between implementations per backend; prints one JSON line per candidate.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit  # noqa: E402
from sana_jax.kernels import linear_attention  # noqa: E402
from sana_jax.models import layers as L  # noqa: E402


def timed(fn, *args, repeats=20):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - start)
  return float(np.median(ts)) * 1e3


def glu_shifted(h, k, b):  # current: [B, H, W, 2, C] -> [B, H, W, C]
  h = L.depthwise_conv(jax.nn.silu(h), k, b)
  return h[..., 0, :] * jax.nn.silu(h[..., 1, :])


def glu_shifted_lowp_pad(h, k, b):  # pad in the input dtype, accumulate in f32
  x = jax.nn.silu(h)
  hh, ww = x.shape[1], x.shape[2]
  xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0), (0, 0)])
  acc = b.astype(jnp.float32)
  for dy in range(3):
    for dx in range(3):
      acc = acc + xp[:, dy:dy + hh, dx:dx + ww].astype(jnp.float32) * k[dy, dx].astype(jnp.float32)
  acc = acc.astype(h.dtype)
  return acc[..., 0, :] * jax.nn.silu(acc[..., 1, :])


def glu_grouped_conv(h, k, b):  # cuDNN / XLA grouped convolution over the flattened 2C channels
  x = jax.nn.silu(h)
  B, H, W, two, C = x.shape
  x = x.reshape(B, H, W, two * C)
  kk = k.reshape(3, 3, 1, two * C)
  y = jax.lax.conv_general_dilated(x, kk, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=two * C)
  y = (y + b.reshape(-1)).reshape(B, H, W, two, C)
  return y[..., 0, :] * jax.nn.silu(y[..., 1, :])


def cross_einsum(q, k, v, bias):
  logits = L.einsum_f32("bnhd,blhd->bhnl", q, k) * q.shape[-1] ** -0.5 + bias[:, None, None, :]
  p = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bhnl,blhd->bnhd", p, v)


def cross_dpa(impl):
  def f(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias[:, None, None, :].astype(q.dtype), implementation=impl)
  return f


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=1024)
  args = p.parse_args()
  dt = jnp.bfloat16
  B, S = args.batch, args.res // 32
  hidden, heads, ch, cd, text = 2880, 36, 16, 72, 300  # Sana 0.6B: width 1152
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32), dt)
  dev = jax.devices()[0].device_kind

  h, k, b = arr(B, S, S, 2, hidden), arr(3, 3, 2, hidden) * 0.3, arr(2, hidden)
  ref = jax.jit(glu_shifted)(h, k, b).astype(jnp.float32)
  for fn in (glu_shifted, glu_shifted_lowp_pad, glu_grouped_conv):
    try:
      out = jax.jit(fn)(h, k, b).astype(jnp.float32)
      err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
      emit(dict(part="mixffn_glu", impl=fn.__name__, device=dev, ms=round(timed(jax.jit(fn), h, k, b), 3),
                rel_err=round(err, 5)))
    except Exception as e:  # noqa: BLE001
      emit(dict(part="mixffn_glu", impl=fn.__name__, error=str(e).splitlines()[0][:200]))

  q, kk, vv = arr(B, S * S, ch, cd), arr(B, text, ch, cd), arr(B, text, ch, cd)
  bias = jnp.where(jnp.arange(text)[None] < 100, 0.0, -10000.0) * jnp.ones((B, 1))
  ref = jax.jit(cross_einsum)(q, kk, vv, bias).astype(jnp.float32)
  for name, fn in (("einsum", cross_einsum), ("dpa_xla", cross_dpa("xla")), ("dpa_cudnn", cross_dpa("cudnn"))):
    try:
      out = jax.jit(fn)(q, kk, vv, bias).astype(jnp.float32)
      err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
      emit(dict(part="cross_attention", impl=name, device=dev, ms=round(timed(jax.jit(fn), q, kk, vv, bias), 3),
                rel_err=round(err, 5)))
    except Exception as e:  # noqa: BLE001
      emit(dict(part="cross_attention", impl=name, error=str(e).splitlines()[0][:200]))

  ql, kl, vl = jax.nn.relu(arr(B, S * S, heads, 32)), jax.nn.relu(arr(B, S * S, heads, 32)), arr(B, S * S, heads, 32)
  emit(dict(part="linear_attention", impl="xla", device=dev,
            ms=round(timed(jax.jit(linear_attention), ql, kl, vl), 3)))

  def lin_lowp(q, k, v, eps=1e-15):  # bf16 operands, f32 accumulation, no HIGHEST (exact for bf16 inputs)
    kv = jnp.einsum("bnhd,bnhe->bhde", k, v, preferred_element_type=jnp.float32)
    ks = jnp.sum(k.astype(jnp.float32), axis=1)
    q32 = q.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    num = jnp.einsum("bnhd,bhde->bnhe", q32, kv, precision=hi)
    den = jnp.einsum("bnhd,bhd->bnh", q32, ks, precision=hi)[..., None]
    return num / (den + eps)

  out = jax.jit(lin_lowp)(ql, kl, vl)
  ref = jax.jit(linear_attention)(ql, kl, vl)
  ms = round(timed(jax.jit(lin_lowp), ql, kl, vl), 3)
  emit(dict(part="linear_attention", impl="lowp_first_dot", device=dev, ms=ms,
            rel_err=float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))))


if __name__ == "__main__":
  main()
