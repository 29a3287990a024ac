"""Sana's ReLU linear attention in Pallas, forward and backward.

Forward: a reduction over sequence blocks into float32 K^T V and sum K, then apply-and-divide.
Backward: a reduction over sequence blocks into d(K^T V) and d(sum K), then one pass giving dq, dk, dv.
Denominators and outputs are recomputed from q and the saved sums, never stored per token.

Layout: q, k, v stay [B, N, H * D] (a free reshape of [B, N, H, D]) and a block takes `lanes`
consecutive channels: one or more whole heads. Every product is a plain 2-D matmul on a
[tokens, lanes] tile: K^T V over all packed heads, with the cross-head entries zeroed by a
block-diagonal mask, and per-head sums as a matmul with that mask. So there is no reshape across
the lane dimension and no batched dot in a kernel. Tiles at the ragged ends (the last sequence
block, the last lane block when H * D is not a multiple of `lanes`) read undefined values past
the array; they are zeroed in-kernel, and writes past the end are dropped by Pallas.

Backends:
  tpu: lanes a multiple of 128 (or all of H * D), tokens a multiple of 8 (or all of N);
       reductions accumulate across the last ("arbitrary") grid axis.
  gpu: linear_attention_gpu.py (Triton lowering: masked tiles, one head per program, chunked
       reductions); `linear_attention_pallas` hands GPU inputs to it.
  CPU: interpret mode only (interpret=True or pltpu.InterpretParams()), with the tpu plan unless
       platform="gpu" asks for the GPU kernels.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static kernel configuration for one input shape."""
  n: int             # tokens
  hd: int            # H * D channels
  d: int             # head dim
  lanes: int         # channels per block: whole heads
  block: int         # tokens per block
  eps: float
  interpret: Any     # False, True, or a pltpu.InterpretParams

  @property
  def grid(self):
    return (pl.cdiv(self.hd, self.lanes), pl.cdiv(self.n, self.block))


def _platform(platform):
  platform = platform or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu", "cpu": "tpu"}.get(platform, platform)


def make_plan(shape, eps=1e-15, block=None, interpret=False):
  """TPU block shapes for q/k/v of `shape` [B, N, H, D]: tiles are (8, 128), so lanes are a
  multiple of 128 (or every channel in one block) and tokens a multiple of 8 (or all of them)."""
  _, n, h, d = shape
  if h * d <= 128:
    lanes = h * d
  elif 128 % d == 0 or d % 128 == 0:
    lanes = max(128, d)
  else:
    raise ValueError(f"head dim {d}: the TPU kernel needs it to divide or be a multiple of 128")
  block = block or 512
  block = n if n <= block else block  # the whole sequence: a full dim is always a legal block
  if block % 8 and block != n:
    raise ValueError(f"block {block}: the TPU kernel needs a multiple of 8")
  return Plan(n=n, hd=h * d, d=d, lanes=lanes, block=block, eps=eps, interpret=interpret)


# ---- in-kernel helpers: every tile is [tokens, lanes] or [lanes, lanes] ----

def _load(ref, plan):
  """The tile with rows past N and channels past H * D zeroed (their contents are undefined)."""
  x = ref[...]
  conds = []
  if plan.n % plan.block:
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0) + pl.program_id(2) * plan.block
    conds.append(rows < plan.n)
  if plan.hd % plan.lanes:
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1) + pl.program_id(1) * plan.lanes
    conds.append(cols < plan.hd)
  for c in conds:
    x = jnp.where(c, x, jnp.zeros_like(x))
  return x


def _dot(a, b, contract):
  """a . b over dims `contract` = (a_dim, b_dim), float32 result. Two bf16 operands go in as they
  are (their products are exact in float32); anything else is a float32 matmul at full precision."""
  if a.dtype == b.dtype == jnp.bfloat16:
    precision = None
  else:
    a, b, precision = a.astype(F32), b.astype(F32), lax.Precision.HIGHEST
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _num_den(q, kv, ksum, mask, eps):
  """num = q K^T V and den = q . sum K + eps, each head's den broadcast over its lanes."""
  num = _dot(q, kv, (1, 0))
  den = _dot(q.astype(F32) * ksum, mask, (1, 0)) + eps
  return num, den


def _cotangents(q, g, kv, ksum, mask, eps):
  """out = num / den: d num = g / den and d den = -(g . out) / den (per head, lane-broadcast)."""
  num, den = _num_den(q, kv, ksum, mask, eps)
  d_num = g / den
  d_den = -_dot(g * (num / den), mask, (1, 0)) / den
  return d_num, d_den


def _store_sum(ref, x):
  """Adds x into a reduction output across the sequential grid axis."""
  @pl.when(pl.program_id(2) == 0)
  def _init():
    ref[...] = jnp.zeros(ref.shape, F32)

  ref[...] += x


# ---- kernels ----

def _fwd_reduce_kernel(k_ref, v_ref, mask_ref, kv_ref, ksum_ref, *, plan):
  k, v = _load(k_ref, plan), _load(v_ref, plan)
  _store_sum(kv_ref, _dot(k, v, (0, 0)) * mask_ref[...])  # same-head pairs only
  _store_sum(ksum_ref, jnp.sum(k.astype(F32), axis=0, keepdims=True))


def _fwd_apply_kernel(q_ref, kv_ref, ksum_ref, mask_ref, o_ref, *, plan):
  num, den = _num_den(_load(q_ref, plan), kv_ref[...], ksum_ref[...], mask_ref[...], plan.eps)
  o_ref[...] = num / den


def _bwd_reduce_kernel(q_ref, g_ref, kv_ref, ksum_ref, mask_ref, dkv_ref, dksum_ref, *, plan):
  q, g, mask = _load(q_ref, plan), _load(g_ref, plan), mask_ref[...]
  d_num, d_den = _cotangents(q, g, kv_ref[...], ksum_ref[...], mask, plan.eps)
  _store_sum(dkv_ref, _dot(q, d_num, (0, 0)) * mask)
  _store_sum(dksum_ref, jnp.sum(d_den * q.astype(F32), axis=0, keepdims=True))


def _bwd_grads_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, mask_ref,
                      dq_ref, dk_ref, dv_ref, *, plan):
  q, g, kv, ksum = _load(q_ref, plan), _load(g_ref, plan), kv_ref[...], ksum_ref[...]
  d_num, d_den = _cotangents(q, g, kv, ksum, mask_ref[...], plan.eps)
  d_kv = dkv_ref[...]
  dq_ref[...] = (_dot(d_num, kv, (1, 1)) + d_den * ksum).astype(dq_ref.dtype)
  dk_ref[...] = (_dot(_load(v_ref, plan), d_kv, (1, 1)) + dksum_ref[...]).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_load(k_ref, plan), d_kv, (1, 0)).astype(dv_ref.dtype)


# ---- pallas_call plumbing ----

def _call(kernel, plan, batch, in_specs, out_specs, out_shape, reduce):
  from jax.experimental.pallas import tpu as pltpu
  semantics = ("parallel", "parallel", "arbitrary" if reduce else "parallel")
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), grid=(batch, *plan.grid), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _specs(plan):
  """BlockSpecs over grid (batch, lane block, sequence block); leading None dims are squeezed."""
  lanes = plan.lanes
  seq = pl.BlockSpec((None, plan.block, lanes), lambda b, g, s: (b, s, g))
  kv = pl.BlockSpec((None, None, lanes, lanes), lambda b, g, s: (b, g, 0, 0))
  ksum = pl.BlockSpec((None, None, 1, lanes), lambda b, g, s: (b, g, 0, 0))
  mask = pl.BlockSpec((lanes, lanes), lambda b, g, s: (0, 0))
  return seq, kv, ksum, mask


def _head_mask(plan):
  """[lanes, lanes] float32: 1 where row and column channels belong to the same head."""
  head = np.arange(plan.lanes) // plan.d
  return jnp.asarray(head[:, None] == head[None, :], F32)


def _reduce(plan, kernel, inputs, in_specs, batch):
  """A sequence reduction into ([B, G, lanes, lanes], [B, G, 1, lanes]) float32 sums."""
  _, kv, ksum, _ = _specs(plan)
  g = plan.grid[0]
  return _call(kernel, plan, batch, in_specs, [kv, ksum],
               [jax.ShapeDtypeStruct((batch, g, plan.lanes, plan.lanes), F32),
                jax.ShapeDtypeStruct((batch, g, 1, plan.lanes), F32)], reduce=True)(*inputs)


def _forward(q, k, v, plan, combine=None):
  b, n, h, d = q.shape
  flat = lambda x: x.reshape(b, n, h * d)
  seq, kv_spec, ksum_spec, mask_spec = _specs(plan)
  mask = _head_mask(plan)
  kv, ksum = _reduce(plan, _fwd_reduce_kernel, (flat(k), flat(v), mask), [seq, seq, mask_spec], b)
  if combine is not None:
    kv, ksum = combine(kv, ksum)
  out = _call(_fwd_apply_kernel, plan, b, [seq, kv_spec, ksum_spec, mask_spec], seq,
              jax.ShapeDtypeStruct((b, n, h * d), F32), reduce=False)(flat(q), kv, ksum, mask)
  return out.reshape(b, n, h, d), (q, k, v, kv, ksum)


def _backward(plan, res, g):
  q, k, v, kv, ksum = res
  b, n, h, d = q.shape
  flat = lambda x: x.reshape(b, n, h * d)
  seq, kv_spec, ksum_spec, mask_spec = _specs(plan)
  mask, qf, gf = _head_mask(plan), flat(q), flat(g.astype(F32))
  d_kv, d_ksum = _reduce(plan, _bwd_reduce_kernel, (qf, gf, kv, ksum, mask),
                         [seq, seq, kv_spec, ksum_spec, mask_spec], b)
  grads = _call(_bwd_grads_kernel, plan, b,
                [seq, seq, seq, seq, kv_spec, ksum_spec, kv_spec, ksum_spec, mask_spec], [seq, seq, seq],
                [jax.ShapeDtypeStruct((b, n, h * d), x.dtype) for x in (q, k, v)],
                reduce=False)(qf, flat(k), flat(v), gf, kv, ksum, d_kv, d_ksum, mask)
  return tuple(x.reshape(b, n, h, d) for x in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, plan):
  return _forward(q, k, v, plan)[0]


_attention.defvjp(_forward, _backward)


def linear_attention_pallas(q, k, v, eps=1e-15, block=None, interpret=False, platform=None, combine=None):
  """q, k, v [B, N, H, D] (ReLU'd q, k) -> [B, N, H, D] float32; same maths as the XLA reference.
  Gradients come back in the input dtypes. `platform` ("tpu" | "gpu") picks the kernels instead of
  the default backend (where CPU means the TPU kernels, interpreted), e.g. to interpret the GPU
  kernels or to lower for another platform with jax.export. `combine(kv, ksum) -> (kv, ksum)` runs between
  the sums and their use (a psum when these are one device's tokens of a longer sequence): forward only."""
  if _platform(platform) == "gpu":
    from sana_jax.kernels.linear_attention_gpu import linear_attention_gpu
    return linear_attention_gpu(q, k, v, eps, block=block, interpret=bool(interpret), combine=combine)
  if _platform(platform) != "tpu":
    raise ValueError(f"no Pallas linear-attention kernels for platform {platform or jax.default_backend()!r}")
  plan = make_plan(q.shape, eps, block, interpret)
  return _attention(q, k, v, plan) if combine is None else _forward(q, k, v, plan, combine)[0]
