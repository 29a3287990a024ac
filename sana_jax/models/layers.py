"""Small building blocks shared by the models. Arrays are NHWC / [B, N, D]; norms compute in float32."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax import parallel

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def einsum_f32(eq, *operands, precision=None):
  """einsum with float32 accumulation and result, whatever the operand dtype.

  On accelerators low-precision operands go straight to the MXU/tensor cores with float32
  accumulation (exactly the float32 result, since products of bf16 numbers fit in float32);
  XLA:CPU has no such dot, so there they are widened first.
  """
  if jax.default_backend() == "cpu":
    operands = [o.astype(jnp.float32) for o in operands]
  return jnp.einsum(eq, *operands, preferred_element_type=jnp.float32, precision=precision)


def masked_attention(q, k, v, bias):
  """Softmax attention, q [B, N, H, D], k/v [B, L, H, D], additive key bias [B, L] (float32).

  On GPUs with low-precision inputs this is cuDNN's fused (flash) attention: no [B, H, N, L]
  logits in memory. Otherwise logits and softmax are float32 einsums, as in the reference.
  """
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    full_bias = jnp.broadcast_to(bias[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=full_bias.astype(q.dtype), implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):  # shape/dtype cuDNN does not take: use XLA
      pass
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first: 1.5x faster batched dots on CPU
  logits = einsum_f32("bhnd,bhld->bhnl", q, k) * (q.shape[-1] ** -0.5) + bias[:, None, None, :]
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.swapaxes(jnp.einsum("bhnl,bhld->bhnd", probs, v), 1, 2)


def param(rngs, init, shape, axes, dtype):
  """A Param carrying logical axis names; parallel.py maps the names to mesh axes.

  Flax's eager sharding (place at creation) is off: params are placed explicitly by
  sana_jax.parallel, so modules build the same with or without a mesh in context.
  """
  with nnx.use_eager_sharding(False):
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class Dense(nnx.Module):
  """y = x @ kernel + bias with logical axes (in_axis, out_axis). `kernel` may have extra out dims."""

  def __init__(self, din, dout, axes, *, use_bias=True, kernel_init=xavier, rngs, dtype, param_dtype):
    dout = tuple(dout) if isinstance(dout, (tuple, list)) else (dout,)
    self.kernel = param(rngs, kernel_init, (din, *dout), axes, param_dtype)
    self.bias = param(rngs, zeros, dout, axes[1:], param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    k = self.kernel[...].astype(self.dtype)
    y = jnp.tensordot(x.astype(self.dtype), k, axes=((x.ndim - 1,), (0,)))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * weight over the last axis, computed in float32 (diffusers' RMSNorm).

  weight_offset=1: the scale is (1 + weight) and weight starts at zero, as Gemma stores it."""

  def __init__(self, dim, axis_name, *, eps, affine=True, bias=False, weight_offset=0.0, rngs, dtype, param_dtype):
    init = zeros if weight_offset else ones
    self.weight = param(rngs, init, (dim,), (axis_name,), param_dtype) if affine else None
    self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype) if affine and bias else None
    self.eps, self.weight_offset, self.dtype = eps, weight_offset, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.weight is not None:
      y = y * (self.weight_offset + self.weight[...].astype(jnp.float32))
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis in float32; affine optional (Sana's block norms have none)."""

  def __init__(self, dim, axis_name, *, eps, affine=False, rngs, dtype, param_dtype):
    self.weight = param(rngs, ones, (dim,), (axis_name,), param_dtype) if affine else None
    self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype) if affine else None
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.weight is not None:
      y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def timestep_sinusoid(t, dim=256, max_period=10000.0):
  """[B] float -> [B, dim] float32 as [cos | sin] (flip_sin_to_cos, no frequency shift)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim, height, width, base_size, interpolation_scale):
  """[height * width, dim] float32, row-major tokens; first half encodes x (width), second y.

  Positions are scaled so the grid spans `base_size` units whatever its size, then divided by
  `interpolation_scale` (the 2K/4K checkpoints' setting). Computed in float64 at trace time.
  """
  ys = np.arange(height, dtype=np.float32) / (height / base_size) / interpolation_scale
  xs = np.arange(width, dtype=np.float32) / (width / base_size) / interpolation_scale
  grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(grid_x), one_axis(grid_y)], axis=1).astype(np.float32)


def depthwise_conv(x, kernel, bias=None):
  """x: [B, H, W, *C], kernel [k, k, *C] (k odd), bias [*C] or None; zero "same" padding,
  one filter per channel.

  GPUs run it as a grouped convolution (cuDNN's depthwise kernels: 2.4x faster than the form
  below at Sana 0.6B shapes on an H100). Elsewhere it is k*k shifted multiply-adds summed in
  float32, which XLA fuses into one memory-bound loop; grouped convs are very slow on XLA:CPU.

  Under a mesh that splits the rows (sequence parallelism, the DC-AE's row split) each device takes
  k // 2 halo rows from each neighbour: the partitioner's own halo exchange keeps several padded copies
  of the whole local block alive (3x the per-device memory of the DiT's Mix-FFN at 8 devices).
  """
  r = kernel.shape[0] // 2
  split = parallel.row_split(x.shape)
  if split is None or x.shape[1] // split[2] < r:
    return _depthwise(x, kernel, bias, row_pad=r)
  mesh, spec, n = split
  rows = spec[1]

  def local(x, kernel, *bias):
    top = jax.lax.ppermute(x[:, -r:], rows, [(j, j + 1) for j in range(n - 1)])     # the previous device's last
    bottom = jax.lax.ppermute(x[:, :r], rows, [(j + 1, j) for j in range(n - 1)])  # and the next one's first rows
    # no device sends to the first one's top or the last one's bottom: ppermute leaves zeros, the image's padding.
    # The block's own zero-padded conv, then what the halos add to its first and last r rows: convs of thin strips
    # (halo rows beside zero rows), so no halo-padded copy of the whole block is made
    out = _depthwise(x, kernel, bias[0] if bias else None, row_pad=r)
    zeros = jnp.zeros_like(top)
    from_top = _depthwise(jnp.concatenate([top, zeros], axis=1), kernel, None, row_pad=r)[:, r:]
    from_bottom = _depthwise(jnp.concatenate([zeros, bottom], axis=1), kernel, None, row_pad=r)[:, :r]
    return out.at[:, :r].add(from_top).at[:, -r:].add(from_bottom)

  replicated = jax.sharding.PartitionSpec()
  params = (kernel,) if bias is None else (kernel, bias)
  return parallel.shard_map(local, mesh, (spec,) + (replicated,) * len(params), spec)(x, *params)


def _depthwise(x, kernel, bias, row_pad):
  """depthwise_conv with `row_pad` zero rows above and below and "same" columns."""
  k, r = kernel.shape[0], kernel.shape[0] // 2
  if jax.default_backend() == "gpu":
    return _depthwise_grouped_conv(x, kernel, bias, row_pad)
  h, w = x.shape[1] + 2 * row_pad - 2 * r, x.shape[2]
  pad = [(0, 0), (row_pad, row_pad), (r, r)] + [(0, 0)] * (x.ndim - 3)
  xp = jnp.pad(x.astype(jnp.float32), pad)
  kernel = kernel.astype(jnp.float32)
  out = jnp.zeros((), jnp.float32) if bias is None else bias.astype(jnp.float32)
  for dy in range(k):
    for dx in range(k):
      out = out + xp[:, dy:dy + h, dx:dx + w] * kernel[dy, dx]
  return out.astype(x.dtype)


def _depthwise_grouped_conv(x, kernel, bias, row_pad):
  shape, k = x.shape, kernel.shape[0]
  channels = int(np.prod(shape[3:]))
  # output in the input dtype (cuDNN accumulates in float32 inside): a float32 result would double
  # the bytes written and need a separate conversion pass, the costliest part of this op
  y = jax.lax.conv_general_dilated(
      x.reshape(*shape[:3], channels), kernel.astype(x.dtype).reshape(k, k, 1, channels), (1, 1),
      [(row_pad, row_pad), (k // 2, k // 2)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)
  if bias is not None:
    y = y + bias.astype(x.dtype).reshape(channels)
  return y.reshape(y.shape[:3] + shape[3:])


class MixFFN(nnx.Module):
  """GLUMBConv: 1x1 expand to (value, gate) -> SiLU -> 3x3 depthwise -> value * SiLU(gate) -> 1x1.

  The expanded channels are stored as [2, hidden] (value, gate) rather than [2 * hidden] so the
  GLU split never crosses a tensor-parallel shard boundary.
  """

  def __init__(self, dim, hidden, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv_inverted = Dense(dim, (2, hidden), ("embed", None, "mlp"), **kw)
    self.conv_depth_kernel = param(rngs, nnx.initializers.normal(1 / 3), (3, 3, 2, hidden),
                                   (None, None, None, "mlp"), param_dtype)
    self.conv_depth_bias = param(rngs, zeros, (2, hidden), (None, "mlp"), param_dtype)
    self.conv_point = Dense(hidden, dim, ("mlp", "embed"), use_bias=False, **kw)

  def __call__(self, x):
    """x: [B, H, W, D] -> [B, H, W, D]."""
    h = jax.nn.silu(self.conv_inverted(x))  # [B, H, W, 2, hidden]
    h = depthwise_conv(h, self.conv_depth_kernel[...], self.conv_depth_bias[...])
    return self.conv_point(h[..., 0, :] * jax.nn.silu(h[..., 1, :]))
