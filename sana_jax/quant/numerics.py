"""The number formats of quantized layers, as pure functions on arrays.

Kernels are [din, *dout] (our Dense layout); a weight's scale is per output channel ([*dout]) or, for
int4, per group of GROUP input channels and output channel ([din / GROUP, *dout]). Activations are
[..., din] with one scale per token (the last axis), or per token and group for int4: dynamic, computed
from the activation itself at every call, so no activation range is calibrated.

Scales are float32, but for int4 groups bfloat16 (float32 would add an eighth to the packed kernel's
bytes; weights are rounded with the rounded scale, so nothing is lost but the scale's own last bits).
Quantizing rounds to nearest and clips symmetrically (int8 to +-127, int4 to +-7,
e4m3 to +-448), so zero maps to zero and a row of zeros gets scale 1 rather than 0.
"""
import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX, INT4_MAX, FP8_MAX = 127.0, 7.0, 448.0
FP8 = jnp.float8_e4m3fn
GROUP = 64  # int4 group size along the input channels, as SVDQuant and Nunchaku use


def _scale(amax, limit):
  return jnp.where(amax > 0, amax / limit, 1.0).astype(jnp.float32)


def _to_int(x, scale, limit):
  return jnp.clip(jnp.round(x / scale), -limit, limit).astype(jnp.int8)


# ---- weights


def int8_weight(kernel):
  """(int8 kernel, float32 scale [*dout]) of a float kernel [din, *dout], per output channel."""
  w = kernel.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(w), axis=0), INT8_MAX)
  return _to_int(w, scale, INT8_MAX), scale


def fp8_weight(kernel):
  """(e4m3 kernel, float32 scale [*dout]): the largest weight of each output channel maps to 448."""
  w = kernel.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(w), axis=0), FP8_MAX)
  return jnp.clip(w / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def padded_inputs(din):
  """din rounded up to whole int4 groups (zero input channels: Sana 1.6B's 5600-wide Mix-FFN)."""
  return -(-din // GROUP) * GROUP


def int4_weight(kernel):
  """(packed uint8 kernel [din_p / 2, *dout], bfloat16 scale [din_p / GROUP, *dout]) of a float kernel
  [din, *dout]: int4 in groups of GROUP input channels, zero-padded to whole groups."""
  w = pad_rows(kernel.astype(jnp.float32), padded_inputs(kernel.shape[0]))
  groups = w.reshape(-1, GROUP, *w.shape[1:])
  scale = _scale(jnp.max(jnp.abs(groups), axis=1), INT4_MAX).astype(jnp.bfloat16)
  q = _to_int(groups, scale.astype(jnp.float32)[:, None], INT4_MAX).reshape(w.shape)
  return pack_int4(q), scale


def pad_rows(w, rows):
  """w with zero rows appended along axis 0 up to `rows`."""
  return jnp.pad(w, [(0, rows - w.shape[0])] + [(0, 0)] * (w.ndim - 1))


def pack_int4(q):
  """int8 values in [-8, 7], [2n, ...] -> uint8 [n, ...]: row 2i in the low nibble, row 2i + 1 in the high."""
  q = q.astype(jnp.uint8) & 0xF
  return q[0::2] | (q[1::2] << 4)


def unpack_int4(packed):
  """uint8 [n, ...] -> int8 [2n, ...], sign-extended: pack_int4's inverse."""
  p = packed.astype(jnp.int8)
  low, high = jnp.right_shift(jnp.left_shift(p, 4), 4), jnp.right_shift(p, 4)  # arithmetic shifts
  return jnp.stack([low, high], axis=1).reshape(-1, *packed.shape[1:])


def int4_dequantize(packed, scale, dtype):
  """The kernel [din_p, *dout] in `dtype` that an int4 kernel stands for."""
  q = unpack_int4(packed)
  groups = q.reshape(scale.shape[0], GROUP, *q.shape[1:]).astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
  return groups.reshape(q.shape).astype(dtype)


# ---- activations


def int8_tokens(x):
  """(int8 x, float32 scale [..., 1]) per token (row of the last axis)."""
  x = x.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True), INT8_MAX)
  return _to_int(x, scale, INT8_MAX), scale


def fp8_tokens(x):
  """(e4m3 x, float32 scale [..., 1]) per token."""
  x = x.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True), FP8_MAX)
  return jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def int4_tokens(x):
  """x [..., din_p] (whole groups) rounded to int4 per token and group of GROUP channels, returned
  dequantized in float32: what the int4 x int4 product sees."""
  x = x.astype(jnp.float32)
  groups = x.reshape(*x.shape[:-1], -1, GROUP)
  scale = _scale(jnp.max(jnp.abs(groups), axis=-1, keepdims=True), INT4_MAX)
  return (_to_int(groups, scale, INT4_MAX).astype(jnp.float32) * scale).reshape(x.shape)


# ---- products


def contract(x, kernel, preferred):
  """x [..., din] . kernel [din, *dout] -> [..., *dout] in `preferred` (int32 for int8 operands)."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, kernel, dims, preferred_element_type=preferred)


def scaled(acc, x_scale, w_scale, extra_dims):
  """acc [..., *dout] times the per-token scale [..., 1] and the per-channel scale [*dout], float32."""
  x_scale = x_scale.reshape(x_scale.shape[:-1] + (1,) * extra_dims)
  return acc.astype(jnp.float32) * x_scale * w_scale


# ---- SVDQuant's decomposition


def smoothing(act_amax, kernel, alpha):
  """Per-input-channel smoothing factors [din]: act_amax^alpha / w_amax^(1 - alpha) (SmoothQuant), where
  w_amax is the largest |weight| of the channel. Dividing the activations by them and multiplying the
  kernel's rows moves activation outliers into the weights; channels never active get 1."""
  w_amax = jnp.max(jnp.abs(kernel.astype(jnp.float32)).reshape(kernel.shape[0], -1), axis=1)
  ok = (act_amax > 0) & (w_amax > 0)
  s = jnp.where(ok, act_amax ** alpha / jnp.where(ok, w_amax, 1.0) ** (1 - alpha), 1.0)
  return jnp.clip(s, 1e-5, 1e5).astype(jnp.float32)


def low_rank(kernel, rank, dtype):
  """(down [din, r], up [r, *dout]) in `dtype`: the leading singular directions of the kernel, the
  singular values split evenly between the two factors."""
  w = kernel.astype(jnp.float32).reshape(kernel.shape[0], -1)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return (u[:, :rank] * root).astype(dtype), (root[:, None] * vt[:rank]).reshape(rank, *kernel.shape[1:]).astype(dtype)


def max_rank(din, dout):
  """The rank of a [din, dout] kernel's low-rank branch: 32, or less for a layer that narrow."""
  return int(min(32, din, np.prod(dout)))
