"""Sana's ReLU linear attention on NVIDIA GPUs: Pallas kernels through the Triton lowering.

The same four kernels as the TPU version (linear_attention_pallas.py), shaped for a GPU:
  forward   reduce: per (batch, head, sequence chunk), a loop over token blocks accumulating
                    K^T V [D, D] and sum K [1, D] in registers; each chunk writes one partial sum
            apply:  per (batch, head, token block), out = q K^T V / (q . sum K + eps)
  backward  reduce: per chunk, d(K^T V) = q^T d_num and d(sum K) = sum d_den q
            grads:  per token block, dq, dk and dv
Chunks exist because grid programs run concurrently: a few per (batch, head) fill the GPU, and
XLA adds their partial sums (a few KB each). A program works on one head (D lanes), so per-head
sums are row sums and no cross-head mask is needed.

Triton's loads and stores are not bounds-checked, so every token tile is loaded and stored with a
row mask (q, k, v stay [B, N, H * D], a free reshape; tiles are [block, D] column slices of it).

bf16 inputs: products of two bf16 tiles run on the tensor cores with float32 accumulation (exact).
A float32 operand (K^T V, or the cotangents) is split into bf16 high and low halves, so its
products are exact to about 2^-16 and still run on the tensor cores, where the XLA reference
pays for float32 matmuls at HIGHEST precision. float32 inputs use full-precision float32 dots.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32, BF16 = jnp.float32, jnp.bfloat16
TARGET_PROGRAMS = 1024  # reduction programs to aim for: several waves over an H100's 132 SMs


@dataclasses.dataclass(frozen=True)
class GpuPlan:
  """Static kernel configuration for one input shape."""
  n: int            # tokens
  h: int            # heads
  d: int            # head dim: the lanes of every tile
  block: int        # tokens per tile
  chunk_blocks: int  # tiles per reduction program
  eps: float
  num_warps: int
  interpret: Any

  @property
  def chunks(self):
    return pl.cdiv(self.n, self.block * self.chunk_blocks)

  @property
  def blocks(self):
    return pl.cdiv(self.n, self.block)


def _pow2(x):
  return x > 0 and not x & (x - 1)


def make_gpu_plan(shape, eps=1e-15, block=None, chunk_blocks=None, num_warps=4, interpret=False):
  """Tiles for q/k/v of `shape` [B, N, H, D]: power-of-two blocks (Triton's rule), at least 16 a side
  (its matmul minimum)."""
  b, n, h, d = shape
  if not _pow2(d) or not 16 <= d <= 256:
    raise ValueError(f"head dim {d}: the GPU kernel needs a power of two in [16, 256]")
  block = block or min(128, max(16, pl.next_power_of_2(n)))
  if not _pow2(block) or block < 16:
    raise ValueError(f"block {block}: the GPU kernel needs a power of two >= 16")
  blocks = pl.cdiv(n, block)
  if chunk_blocks is None:  # enough programs to fill the device, as long a loop as that allows
    chunks = min(blocks, max(1, TARGET_PROGRAMS // (b * h)))
    chunk_blocks = pl.cdiv(blocks, chunks)
  return GpuPlan(n=n, h=h, d=d, block=block, chunk_blocks=chunk_blocks, eps=eps, num_warps=num_warps,
                 interpret=interpret)


# ---- in-kernel helpers ----

def _rows(plan, block_index):
  """Token indices and the in-bounds mask of tile `block_index`, [block, D]."""
  rows = block_index * plan.block + lax.broadcasted_iota(jnp.int32, (plan.block, plan.d), 0)
  return rows < plan.n


def _where():
  """(batch row, head) of this program; read once, outside loops (interpret mode needs that)."""
  return pl.program_id(0), pl.program_id(1)


def _tile(ref, plan, at, block_index):
  """Ref view of the [block, D] tile `block_index` of batch row and head `at`."""
  b, h = at
  return ref.at[b, pl.ds(block_index * plan.block, plan.block), pl.ds(h * plan.d, plan.d)]


def _load(ref, plan, at, block_index):
  return pltriton.load(_tile(ref, plan, at, block_index), mask=_rows(plan, block_index), other=0)


def _store(ref, plan, at, block_index, x):
  pltriton.store(_tile(ref, plan, at, block_index), x.astype(ref.dtype), mask=_rows(plan, block_index))


def _split(x):
  """float32 -> (hi, lo) bf16 with hi + lo = x to about 2^-16 relative."""
  hi = x.astype(BF16)
  return hi, (x - hi.astype(F32)).astype(BF16)


def _mm(a, b, contract):
  dims = (((contract[0],), (contract[1],)), ((), ()))
  precision = None if a.dtype == BF16 else lax.Precision.HIGHEST
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _dot_for(low_precision):
  """a . b over dims `contract` = (a_dim, b_dim), float32. With bf16 inputs (low_precision), a
  float32 operand is split into bf16 halves: two or three tensor-core products, the smallest
  (lo x lo) dropped. With float32 inputs, full-precision float32 products."""
  def dot(a, b, contract):
    if not low_precision:
      return _mm(a.astype(F32), b.astype(F32), contract)
    a_parts = _split(a) if a.dtype == F32 else (a,)
    b_parts = _split(b) if b.dtype == F32 else (b,)
    terms = [(x, y) for i, x in enumerate(a_parts) for j, y in enumerate(b_parts) if i + j < 2]
    out = _mm(*terms[0], contract)
    for x, y in terms[1:]:
      out = out + _mm(x, y, contract)
    return out
  return dot


def _num_den(q, kv, ksum, eps, dot):
  """num = q K^T V [block, D] and den = q . sum K + eps [block, 1]."""
  return dot(q, kv, (1, 0)), jnp.sum(q.astype(F32) * ksum, axis=1, keepdims=True) + eps


def _cotangents(q, g, kv, ksum, eps, dot):
  """out = num / den: d num = g / den, d den = -(g . out) / den."""
  num, den = _num_den(q, kv, ksum, eps, dot)
  d_num = g / den
  return d_num, -jnp.sum(g * (num / den), axis=1, keepdims=True) / den


# ---- kernels: grid (batch, head, chunk or block) ----

def _reduction(plan, body, init):
  """Runs body(block_index, carry) over this program's chunk of token blocks."""
  first = pl.program_id(2) * plan.chunk_blocks
  return lax.fori_loop(0, plan.chunk_blocks, lambda i, c: body(first + i, c), init)


def _fwd_reduce_kernel(k_ref, v_ref, kv_ref, ksum_ref, *, plan, dot):
  at = _where()

  def body(i, carry):
    kv, ksum = carry
    k, v = _load(k_ref, plan, at, i), _load(v_ref, plan, at, i)
    return kv + dot(k, v, (0, 0)), ksum + jnp.sum(k.astype(F32), axis=0, keepdims=True)
  kv, ksum = _reduction(plan, body, (jnp.zeros((plan.d, plan.d), F32), jnp.zeros((1, plan.d), F32)))
  kv_ref[...], ksum_ref[...] = kv, ksum


def _fwd_apply_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, plan, dot):
  at, i = _where(), pl.program_id(2)
  num, den = _num_den(_load(q_ref, plan, at, i), kv_ref[...], ksum_ref[...], plan.eps, dot)
  _store(o_ref, plan, at, i, num / den)


def _bwd_reduce_kernel(q_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, *, plan, dot):
  at, kv, ksum = _where(), kv_ref[...], ksum_ref[...]

  def body(i, carry):
    dkv, dksum = carry
    q, g = _load(q_ref, plan, at, i), _load(g_ref, plan, at, i)
    d_num, d_den = _cotangents(q, g, kv, ksum, plan.eps, dot)
    return dkv + dot(q, d_num, (0, 0)), dksum + jnp.sum(d_den * q.astype(F32), axis=0, keepdims=True)
  dkv, dksum = _reduction(plan, body, (jnp.zeros((plan.d, plan.d), F32), jnp.zeros((1, plan.d), F32)))
  dkv_ref[...], dksum_ref[...] = dkv, dksum


def _bwd_grads_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, dq_ref, dk_ref, dv_ref,
                      *, plan, dot):
  at, i = _where(), pl.program_id(2)
  q, g, kv, ksum, dkv = _load(q_ref, plan, at, i), _load(g_ref, plan, at, i), kv_ref[...], ksum_ref[...], dkv_ref[...]
  d_num, d_den = _cotangents(q, g, kv, ksum, plan.eps, dot)
  _store(dq_ref, plan, at, i, dot(d_num, kv, (1, 1)) + d_den * ksum)
  _store(dk_ref, plan, at, i, dot(_load(v_ref, plan, at, i), dkv, (1, 1)) + dksum_ref[...])
  _store(dv_ref, plan, at, i, dot(_load(k_ref, plan, at, i), dkv, (1, 0)))


# ---- pallas_call plumbing ----

def _sums_specs(plan, per_chunk):
  """BlockSpecs of [B, H, (chunks,) D, D] and [B, H, (chunks,) 1, D] float32 sums."""
  if per_chunk:
    return (pl.BlockSpec((None, None, None, plan.d, plan.d), lambda b, h, c: (b, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, 1, plan.d), lambda b, h, c: (b, h, c, 0, 0)))
  return (pl.BlockSpec((None, None, plan.d, plan.d), lambda b, h, c: (b, h, 0, 0)),
          pl.BlockSpec((None, None, 1, plan.d), lambda b, h, c: (b, h, 0, 0)))


def _call(kernel, plan, batch, steps, in_specs, out_specs, out_shape, low_precision):
  return pl.pallas_call(
      functools.partial(kernel, plan=plan, dot=_dot_for(low_precision)), grid=(batch, plan.h, steps),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret,
      compiler_params=pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=2))


def _reduce(plan, kernel, inputs, in_specs, batch, low_precision):
  kv_part, ksum_part = _sums_specs(plan, per_chunk=True)
  shapes = [jax.ShapeDtypeStruct((batch, plan.h, plan.chunks, plan.d, plan.d), F32),
            jax.ShapeDtypeStruct((batch, plan.h, plan.chunks, 1, plan.d), F32)]
  kv, ksum = _call(kernel, plan, batch, plan.chunks, in_specs, [kv_part, ksum_part], shapes,
                   low_precision)(*inputs)
  return kv.sum(axis=2), ksum.sum(axis=2)


def _seq_spec(plan, x):
  return pl.BlockSpec(x.shape, lambda b, h, c: (0, 0, 0))


def _forward(q, k, v, plan, combine=None):
  b, n, h, d = q.shape
  low = q.dtype == BF16
  qf, kf, vf = (x.reshape(b, n, h * d) for x in (q, k, v))
  seq = _seq_spec(plan, qf)
  kv, ksum = _reduce(plan, _fwd_reduce_kernel, (kf, vf), [seq, seq], b, low)
  if combine is not None:
    kv, ksum = combine(kv, ksum)
  sums = _sums_specs(plan, per_chunk=False)
  out = _call(_fwd_apply_kernel, plan, b, plan.blocks, [seq, *sums], seq,
              jax.ShapeDtypeStruct((b, n, h * d), F32), low)(qf, kv, ksum)
  return out.reshape(b, n, h, d), (q, k, v, kv, ksum)


def _backward(plan, res, g):
  q, k, v, kv, ksum = res
  b, n, h, d = q.shape
  low = q.dtype == BF16
  qf, kf, vf = (x.reshape(b, n, h * d) for x in (q, k, v))
  gf = g.astype(F32).reshape(b, n, h * d)
  seq, gseq = _seq_spec(plan, qf), _seq_spec(plan, gf)
  sums = _sums_specs(plan, per_chunk=False)
  d_kv, d_ksum = _reduce(plan, _bwd_reduce_kernel, (qf, gf, kv, ksum), [seq, gseq, *sums], b, low)
  grads = _call(_bwd_grads_kernel, plan, b, plan.blocks, [seq, seq, seq, gseq, *sums, *sums], [seq, seq, seq],
                [jax.ShapeDtypeStruct((b, n, h * d), x.dtype) for x in (q, k, v)], low)(
                    qf, kf, vf, gf, kv, ksum, d_kv, d_ksum)
  return tuple(x.reshape(b, n, h, d) for x in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, plan):
  return _forward(q, k, v, plan)[0]


_attention.defvjp(_forward, _backward)


def linear_attention_gpu(q, k, v, eps=1e-15, block=None, chunk_blocks=None, num_warps=4, interpret=False,
                         combine=None):
  """q, k, v [B, N, H, D] (ReLU'd q, k; one dtype) -> [B, N, H, D] float32, the XLA reference's maths.
  Gradients come back in the input dtype. `combine`: as linear_attention_pallas's (forward only)."""
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  plan = make_gpu_plan(q.shape, eps, block, chunk_blocks, num_warps, interpret)
  return _attention(q, k, v, plan) if combine is None else _forward(q, k, v, plan, combine)[0]
