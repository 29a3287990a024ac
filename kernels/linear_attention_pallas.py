"""Sana's ReLU linear attention as two Pallas kernels: a reduction over sequence blocks into per-head
float32 K^T V and sum K, then the apply-and-divide pass over query blocks.

Heads are packed into the lane dimension (4 x 32 = 128 lanes where the head count allows) so blocks
meet TPU tiling. The sequence is zero-padded to whole blocks: zero keys add nothing to the sums and
zero queries are sliced off. Runs compiled on TPU/GPU and in interpret mode on CPU (tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _heads_per_block(heads):
  return next(hp for hp in (4, 2, 1) if heads % hp == 0)


def _pack(x, hp):
  """[B, N, H, D] -> [B, H / hp, N, hp * D]."""
  b, n, h, d = x.shape
  return x.reshape(b, n, h // hp, hp * d).transpose(0, 2, 1, 3)


def _unpack(x, heads):
  """[B, G, N, hp * D] -> [B, N, H, D]."""
  b, g, n, lanes = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, n, heads, lanes * g // heads)


def _reduce_kernel(k_ref, v_ref, kv_ref, ksum_ref, *, hp, d):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    kv_ref[...] = jnp.zeros(kv_ref.shape, jnp.float32)
    ksum_ref[...] = jnp.zeros(ksum_ref.shape, jnp.float32)

  k = k_ref[0, 0].astype(jnp.float32).reshape(-1, hp, d)
  v = v_ref[0, 0].astype(jnp.float32).reshape(-1, hp, d)
  kv_ref[0, 0] += jnp.einsum("nhd,nhe->hde", k, v, precision=jax.lax.Precision.HIGHEST)
  ksum_ref[0, 0] += jnp.sum(k, axis=0)


def _apply_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, hp, d, eps):
  q = q_ref[0, 0].astype(jnp.float32).reshape(-1, hp, d)
  hi = jax.lax.Precision.HIGHEST
  num = jnp.einsum("nhd,hde->nhe", q, kv_ref[0, 0], precision=hi)
  den = jnp.einsum("nhd,hd->nh", q, ksum_ref[0, 0], precision=hi)[..., None]
  o_ref[0, 0] = (num / (den + eps)).reshape(q.shape[0], hp * d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def linear_attention_pallas(q, k, v, eps=1e-15, block=128, interpret=False):
  """q, k, v [B, N, H, D] (ReLU'd q, k) -> [B, N, H, D] float32; same maths as the XLA reference."""
  return _forward(q, k, v, eps, block, interpret)[0]


def _forward(q, k, v, eps, block, interpret):
  b, n, h, d = q.shape
  hp = _heads_per_block(h)
  g, lanes = h // hp, hp * d
  block = min(block, max(8, -(-n // 8) * 8))
  padded = -(-n // block) * block
  pad = lambda x: jnp.pad(_pack(x, hp), ((0, 0), (0, 0), (0, padded - n), (0, 0)))
  qp, kp, vp = pad(q), pad(k), pad(v)
  grid = (b, g, padded // block)
  seq_spec = pl.BlockSpec((1, 1, block, lanes), lambda i, j, s: (i, j, s, 0))
  kv_spec = pl.BlockSpec((1, 1, hp, d, d), lambda i, j, s: (i, j, 0, 0, 0))
  ksum_spec = pl.BlockSpec((1, 1, hp, d), lambda i, j, s: (i, j, 0, 0))
  kv, ksum = pl.pallas_call(
      functools.partial(_reduce_kernel, hp=hp, d=d), grid=grid, in_specs=[seq_spec, seq_spec],
      out_specs=[kv_spec, ksum_spec],
      out_shape=[jax.ShapeDtypeStruct((b, g, hp, d, d), jnp.float32), jax.ShapeDtypeStruct((b, g, hp, d), jnp.float32)],
      interpret=interpret)(kp, vp)
  out = pl.pallas_call(
      functools.partial(_apply_kernel, hp=hp, d=d, eps=eps), grid=grid, in_specs=[seq_spec, kv_spec, ksum_spec],
      out_specs=seq_spec, out_shape=jax.ShapeDtypeStruct((b, g, padded, lanes), jnp.float32),
      interpret=interpret)(qp, kv, ksum)
  out = _unpack(out[:, :, :n], h)
  # residuals for the backward pass, heads first: [B, H, D, D] and [B, H, D]
  return out, (q, k, v, kv.reshape(b, h, d, d), ksum.reshape(b, h, d), out)


def _fwd(q, k, v, eps, block, interpret):
  out, res = _forward(q, k, v, eps, block, interpret)
  return out, res


def _bwd(eps, block, interpret, res, g):
  """out = num / (den + eps), num = q (K^T V), den = q . sum K; gradients through both sums."""
  q, k, v, kv, ksum, out = res
  hi = jax.lax.Precision.HIGHEST
  f32 = lambda x: x.astype(jnp.float32)
  q32, k32, v32, g = f32(q), f32(k), f32(v), f32(g)
  den = jnp.einsum("bnhd,bhd->bnh", q32, ksum, precision=hi)[..., None] + eps
  d_num = g / den                                            # [B, N, H, D]
  d_den = -jnp.sum(g * out, axis=-1) / den[..., 0]           # [B, N, H]
  dq = jnp.einsum("bnhe,bhde->bnhd", d_num, kv, precision=hi) + d_den[..., None] * ksum[:, None]
  d_kv = jnp.einsum("bnhd,bnhe->bhde", q32, d_num, precision=hi)
  d_ksum = jnp.einsum("bnh,bnhd->bhd", d_den, q32, precision=hi)
  dk = jnp.einsum("bnhe,bhde->bnhd", v32, d_kv, precision=hi) + d_ksum[:, None]
  dv = jnp.einsum("bnhd,bhde->bnhe", k32, d_kv, precision=hi)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


linear_attention_pallas.defvjp(_fwd, _bwd)
