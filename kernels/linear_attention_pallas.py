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

Backends (a plan picks the block shapes and how reductions run):
  tpu: lanes a multiple of 128 (or all of H * D), tokens a multiple of 8 (or all of N);
       reductions accumulate across the last ("arbitrary") grid axis.
  gpu: Triton lowering (power-of-two blocks, one head each); grid programs run concurrently, so
       each sequence block writes its own partial sum and XLA adds them. The default Pallas GPU
       lowering of JAX 0.10 (Mosaic GPU) has no rule for dot_general in these kernels, hence
       Triton is named explicitly. Neither GPU nor TPU block sizes are tuned on a device yet.
  CPU: interpret mode only (interpret=True or pltpu.InterpretParams()), with the tpu plan unless
       platform="gpu" asks for the other.
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
  accumulate: bool   # reduce across the sequential grid axis (tpu) or write per-block partials (gpu)
  platform: str      # "tpu" | "gpu": block rules and compiler parameters
  eps: float
  interpret: Any     # False, True, or a pltpu.InterpretParams

  @property
  def grid(self):
    return (pl.cdiv(self.hd, self.lanes), pl.cdiv(self.n, self.block))


def _next_pow2(x):
  return 1 << max(0, x - 1).bit_length()


def _platform(platform):
  platform = platform or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu", "cpu": "tpu"}.get(platform, platform)


def make_plan(shape, eps=1e-15, block=None, interpret=False, platform=None):
  """Block shapes for q/k/v of `shape` [B, N, H, D] on `platform` (default: the default backend)."""
  _, n, h, d = shape
  platform = _platform(platform)
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"no Pallas linear-attention plan for platform {platform!r}")
  if platform == "gpu":  # Triton: power-of-two tiles of at least 16 a side
    if d & (d - 1) or not 16 <= d <= 128:
      raise ValueError(f"head dim {d}: the GPU kernel needs a power of two in [16, 128]")
    lanes = d  # one head per block: full-precision float32 matmuls run on CUDA cores, where
    # packed heads' masked cross-head products would be pure extra work
    block = min(block or 64, max(16, _next_pow2(n)))
    if block & (block - 1) or block < 16:
      raise ValueError(f"block {block}: the GPU kernel needs a power of two >= 16")
  else:  # TPU tiles are (8, 128): lanes a multiple of 128, or every channel in one block
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
  return Plan(n=n, hd=h * d, d=d, lanes=lanes, block=block, accumulate=platform == "tpu",
              platform=platform, eps=eps, interpret=interpret)


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


def _store_sum(ref, x, plan):
  """Adds x into a reduction output: across grid steps (tpu) or as this block's partial (gpu)."""
  if not plan.accumulate:
    ref[...] = x
    return

  @pl.when(pl.program_id(2) == 0)
  def _init():
    ref[...] = jnp.zeros(ref.shape, F32)

  ref[...] += x


# ---- kernels ----

def _fwd_reduce_kernel(k_ref, v_ref, mask_ref, kv_ref, ksum_ref, *, plan):
  k, v = _load(k_ref, plan), _load(v_ref, plan)
  _store_sum(kv_ref, _dot(k, v, (0, 0)) * mask_ref[...], plan)  # same-head pairs only
  _store_sum(ksum_ref, jnp.sum(k.astype(F32), axis=0, keepdims=True), plan)


def _fwd_apply_kernel(q_ref, kv_ref, ksum_ref, mask_ref, o_ref, *, plan):
  num, den = _num_den(_load(q_ref, plan), kv_ref[...], ksum_ref[...], mask_ref[...], plan.eps)
  o_ref[...] = num / den


def _bwd_reduce_kernel(q_ref, g_ref, kv_ref, ksum_ref, mask_ref, dkv_ref, dksum_ref, *, plan):
  q, g, mask = _load(q_ref, plan), _load(g_ref, plan), mask_ref[...]
  d_num, d_den = _cotangents(q, g, kv_ref[...], ksum_ref[...], mask, plan.eps)
  _store_sum(dkv_ref, _dot(q, d_num, (0, 0)) * mask, plan)
  _store_sum(dksum_ref, jnp.sum(d_den * q.astype(F32), axis=0, keepdims=True), plan)


def _bwd_grads_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, mask_ref,
                      dq_ref, dk_ref, dv_ref, *, plan):
  q, g, kv, ksum = _load(q_ref, plan), _load(g_ref, plan), kv_ref[...], ksum_ref[...]
  d_num, d_den = _cotangents(q, g, kv, ksum, mask_ref[...], plan.eps)
  d_kv = dkv_ref[...]
  dq_ref[...] = (_dot(d_num, kv, (1, 1)) + d_den * ksum).astype(dq_ref.dtype)
  dk_ref[...] = (_dot(_load(v_ref, plan), d_kv, (1, 1)) + dksum_ref[...]).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_load(k_ref, plan), d_kv, (1, 0)).astype(dv_ref.dtype)


# ---- pallas_call plumbing ----

def _compiler_params(plan, semantics):
  if plan.platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics)
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams()


def _call(kernel, plan, batch, in_specs, out_specs, out_shape, reduce):
  semantics = ("parallel", "parallel", "arbitrary" if reduce and plan.accumulate else "parallel")
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), grid=(batch, *plan.grid), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret,
      compiler_params=_compiler_params(plan, semantics))


def _specs(plan):
  """BlockSpecs over grid (batch, lane block, sequence block); leading None dims are squeezed."""
  lanes = plan.lanes
  seq = pl.BlockSpec((None, plan.block, lanes), lambda b, g, s: (b, s, g))
  kv = pl.BlockSpec((None, None, lanes, lanes), lambda b, g, s: (b, g, 0, 0))
  ksum = pl.BlockSpec((None, None, 1, lanes), lambda b, g, s: (b, g, 0, 0))
  mask = pl.BlockSpec((lanes, lanes), lambda b, g, s: (0, 0))
  part = (lambda b, g, s: (b, g, 0, 0, 0)) if plan.accumulate else (lambda b, g, s: (b, g, s, 0, 0))
  kv_part = pl.BlockSpec((None, None, None, lanes, lanes), part)
  ksum_part = pl.BlockSpec((None, None, None, 1, lanes), part)
  return seq, kv, ksum, mask, kv_part, ksum_part


def _head_mask(plan):
  """[lanes, lanes] float32: 1 where row and column channels belong to the same head."""
  head = np.arange(plan.lanes) // plan.d
  return jnp.asarray(head[:, None] == head[None, :], F32)


def _reduce(plan, kernel, inputs, in_specs, batch):
  """A sequence reduction into ([B, G, lanes, lanes], [B, G, 1, lanes]) float32 sums."""
  *_, kv_part, ksum_part = _specs(plan)
  parts = 1 if plan.accumulate else plan.grid[1]
  g = plan.grid[0]
  kv, ksum = _call(kernel, plan, batch, in_specs, [kv_part, ksum_part],
                   [jax.ShapeDtypeStruct((batch, g, parts, plan.lanes, plan.lanes), F32),
                    jax.ShapeDtypeStruct((batch, g, parts, 1, plan.lanes), F32)], reduce=True)(*inputs)
  return kv.sum(axis=2), ksum.sum(axis=2)


def _forward(q, k, v, plan):
  b, n, h, d = q.shape
  flat = lambda x: x.reshape(b, n, h * d)
  seq, kv_spec, ksum_spec, mask_spec, *_ = _specs(plan)
  mask = _head_mask(plan)
  kv, ksum = _reduce(plan, _fwd_reduce_kernel, (flat(k), flat(v), mask), [seq, seq, mask_spec], b)
  out = _call(_fwd_apply_kernel, plan, b, [seq, kv_spec, ksum_spec, mask_spec], seq,
              jax.ShapeDtypeStruct((b, n, h * d), F32), reduce=False)(flat(q), kv, ksum, mask)
  return out.reshape(b, n, h, d), (q, k, v, kv, ksum)


def _backward(plan, res, g):
  q, k, v, kv, ksum = res
  b, n, h, d = q.shape
  flat = lambda x: x.reshape(b, n, h * d)
  seq, kv_spec, ksum_spec, mask_spec, *_ = _specs(plan)
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


def linear_attention_pallas(q, k, v, eps=1e-15, block=None, interpret=False, platform=None):
  """q, k, v [B, N, H, D] (ReLU'd q, k) -> [B, N, H, D] float32; same maths as the XLA reference.
  Gradients come back in the input dtypes. `platform` ("tpu" | "gpu") overrides the default
  backend's block rules, e.g. to check the GPU plan in interpret mode or to lower for another
  platform with jax.export."""
  if _platform(platform) == "gpu":
    from sana_jax.kernels.linear_attention_gpu import linear_attention_gpu
    return linear_attention_gpu(q, k, v, eps, block=block, interpret=bool(interpret))
  return _attention(q, k, v, make_plan(q.shape, eps, block, interpret, platform))
