"""Quantized implementations of models.layers.Dense: the same call, y = x @ kernel + bias, with other
parameters. Each is built from the float Dense's arrays by `sana_jax.quant.model`, which also gives the
parameters their logical axes (those of the kernel they replace).

- Int8Dense (W8A8): int8 kernel and per-channel scales; activations rounded to int8 per token at every
  call; an int8 x int8 product accumulated in int32, then scaled.
- Fp8Dense: the same in float8 e4m3, accumulated in float32.
- SVDQuantDense (W4A4): activations divided by per-channel smoothing factors, then a 16-bit low-rank
  branch x @ down @ up plus the int4 residual: int4 activations per token and group of 64 channels
  times the packed int4 kernel, unpacked on the fly.
- WeightOnlyDense: a quantized kernel restored to 16-bit before an ordinary product (layers that run
  once per generation: the cross-attention keys and values of the text).
"""
import jax.numpy as jnp
from flax import nnx

from sana_jax.quant import numerics as N


def param(value, axes):
  """An nnx.Param with logical axes (placed by sana_jax.parallel, like every model weight)."""
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class QuantizedDense(nnx.Module):
  """Shared by the formats: the bias (kept in 16-bit) and the output dtype."""

  def __init__(self, bias, bias_axes, dtype):
    self.bias = None if bias is None else param(bias, bias_axes)
    self.dtype = dtype

  def finish(self, y):
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Int8Dense(QuantizedDense):
  quantize_tokens, accumulate = staticmethod(N.int8_tokens), jnp.int32

  def __init__(self, kernel, scale, bias, axes, *, dtype):
    """kernel int8 [(L,) din, *dout], scale float32 [(L,) *dout]; axes: the float kernel's."""
    super().__init__(bias, _out(axes), dtype)
    self.kernel, self.kernel_scale = param(kernel, axes), param(scale, _out(axes))

  def __call__(self, x):
    xq, x_scale = self.quantize_tokens(x)
    kernel = self.kernel[...]
    acc = N.contract(xq, kernel, self.accumulate)
    return self.finish(N.scaled(acc, x_scale, self.kernel_scale[...], kernel.ndim - 1))


class Fp8Dense(Int8Dense):
  """kernel float8_e4m3fn; otherwise Int8Dense's parameters and call, accumulated in float32."""
  quantize_tokens, accumulate = staticmethod(N.fp8_tokens), jnp.float32


class SVDQuantDense(QuantizedDense):

  def __init__(self, smooth, down, up, packed, scale, bias, axes, *, dtype):
    """smooth float32 [(L,) din]; down [(L,) din, r] and up [(L,) r, *dout] in 16-bit; packed uint8
    [(L,) din_p / 2, *dout] and scale bfloat16 [(L,) din_p / 64, *dout]: the int4 residual."""
    super().__init__(bias, _out(axes), dtype)
    lead, din_axis, out_axes = _split(axes)
    self.smooth = param(smooth, lead + (din_axis,))
    self.lora_down = param(down, lead + (din_axis, None))
    self.lora_up = param(up, lead + (None,) + out_axes)
    self.kernel = param(packed, axes)
    self.kernel_scale = param(scale, lead + (None,) + out_axes)

  def __call__(self, x):
    xs = x.astype(jnp.float32) / self.smooth[...]
    down, up = self.lora_down[...], self.lora_up[...]
    branch = N.contract(N.contract(xs.astype(down.dtype), down, jnp.float32).astype(up.dtype), up, jnp.float32)
    kernel = N.int4_dequantize(self.kernel[...], self.kernel_scale[...], self.dtype)
    xr = N.int4_tokens(_pad_last(xs, kernel.shape[0])).astype(self.dtype)
    return self.finish(branch + N.contract(xr, kernel, jnp.float32))


class WeightOnlyDense(QuantizedDense):

  def __init__(self, kernel, scale, bias, axes, *, dtype):
    """kernel: int8 or e4m3 with a per-channel scale [(L,) *dout], or packed int4 with group scales
    [(L,) din_p / 64, *dout] (then `din` rows of the restored kernel are used)."""
    super().__init__(bias, _out(axes), dtype)
    lead, _, out_axes = _split(axes)
    grouped = kernel.dtype == jnp.uint8
    self.kernel = param(kernel, axes)
    self.kernel_scale = param(scale, lead + ((None,) if grouped else ()) + out_axes)

  def __call__(self, x):
    k, scale = self.kernel[...], self.kernel_scale[...]
    if k.dtype == jnp.uint8:
      k = N.int4_dequantize(k, scale, self.dtype)[:x.shape[-1]]
    else:
      k = (k.astype(jnp.float32) * scale).astype(self.dtype)
    return self.finish(N.contract(x.astype(self.dtype), k, jnp.float32))


def _split(axes):
  """(leading "layers" axes, the input axis, the output axes) of a kernel's logical axes."""
  lead = tuple(axes[:1]) if axes and axes[0] == "layers" else ()
  return lead, axes[len(lead)], tuple(axes[len(lead) + 1:])


def _out(axes):
  lead, _, out_axes = _split(axes)
  return lead + out_axes


def _pad_last(x, size):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
