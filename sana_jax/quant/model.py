"""Which of the DiT's layers are quantized, and how a float SanaTransformer becomes a quantized one.

The blocks' projections that run on image tokens at every step take quantized weights and quantized
activations: self-attention q, k, v and out, cross-attention q and out, the Mix-FFN's conv_inverted
and conv_point. The cross-attention keys and values of the text run once per generation: their
kernels are stored quantized (weight only) and restored to 16-bit, so the K/V they give stay 16-bit.
Norms, the linear-attention sums, softmax attention, the depthwise conv, the embeddings and the final
layer are not touched. The model keeps its class and call; `model.quantization` names the mode.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax.errors import SanaError, short
from sana_jax.quant import layers as Q
from sana_jax.quant import numerics as N

MODES = ("int8", "fp8", "w4a4")
ACTIVATION_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_out",
                     "ff.conv_inverted", "ff.conv_point")
WEIGHT_ONLY_LAYERS = ("attn2.to_k", "attn2.to_v")
# SanaPipeline.quantize's default w4a4 calibration set: varied subjects, styles and layouts
CALIBRATION_PROMPTS = (
    "a photograph of a red fox standing in deep snow at dawn",
    "an oil painting of a busy harbour with sailing boats under a cloudy sky",
    "a close-up portrait of an elderly woman smiling, soft window light",
    "a futuristic city skyline at night with neon signs, cinematic",
    "a bowl of fresh fruit on a wooden table, still life",
    "a cartoon cat wearing a wizard hat, flat colours, white background",
    "a mountain lake reflecting pine trees, aerial view",
    "the words 'hello world' written in chalk on a blackboard",
)
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: outliers shared evenly by activations and weights


def check_mode(mode):
  if mode not in MODES:
    raise SanaError(f"quantization mode {short(mode)}; expected one of {', '.join(MODES)}")


def check_backend(mode, device=None):
  """SanaError when `device` (default: the first) cannot run `mode`'s products. fp8 matmuls need an
  NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); XLA:CPU and TPUs convert e4m3 operands
  themselves, and int8 / int4 run everywhere."""
  check_mode(mode)
  device = device or jax.devices()[0]
  if mode == "fp8" and device.platform == "gpu":
    capability = str(getattr(device, "compute_capability", "0"))
    if tuple(int(p) for p in capability.split(".")[:2]) < (8, 9):
      raise SanaError(f"quantization mode fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                      f"{device.device_kind} is {capability}: use int8")


def mode_of(model):
  """The quantization mode of a SanaTransformer, or None for a float one."""
  return getattr(model, "quantization", None)


def quantize_transformer(model, mode, statistics=None, *, alpha=SMOOTHING_ALPHA):
  """A copy of `model` (a float SanaTransformer) with its block projections in `mode` (MODES). w4a4
  needs `statistics` {layer name: largest |input| per channel [layers, din]} (sana_jax.quant.calibrate);
  int8 and fp8 scale activations per token at every call and need none."""
  from sana_jax.models.controlnet import SanaControlNetModel
  check_mode(mode)
  if isinstance(model, SanaControlNetModel):
    raise SanaError("a ControlNet is not quantized: quantize the pipeline's transformer, the ControlNet stays 16-bit")
  if mode_of(model) is not None:
    raise SanaError(f"the transformer is already quantized ({mode_of(model)}); load its float weights to requantize")
  if mode == "w4a4":
    missing = [name for name in ACTIVATION_LAYERS if name not in (statistics or {})]
    if missing:
      raise SanaError(f"w4a4 needs calibration statistics for every quantized layer; missing {short(missing)}")
  return _quantized(model, mode, statistics, alpha)


def abstract_quantized(build, mode):
  """The abstract quantized model (nnx.eval_shape) of the float model `build()` makes: the target a
  quantized directory is loaded into."""
  return nnx.eval_shape(lambda: _quantized(build(), mode, None, SMOOTHING_ALPHA))


def _quantized(model, mode, statistics, alpha):
  model = nnx.clone(model)
  for name in ACTIVATION_LAYERS + WEIGHT_ONLY_LAYERS:
    parent, leaf = parent_of(model.blocks, name)
    dense = getattr(parent, leaf)
    axes = tuple(dense.kernel.get_metadata()["out_sharding"])
    kernel, bias = dense.kernel[...], None if dense.bias is None else dense.bias[...]
    kw = dict(bias=bias, axes=axes, dtype=dense.dtype)
    if name in WEIGHT_ONLY_LAYERS:
      weight = {"int8": N.int8_weight, "fp8": N.fp8_weight, "w4a4": N.int4_weight}[mode]
      new = Q.WeightOnlyDense(*jax.vmap(weight)(kernel), **kw)
    elif mode == "int8":
      new = Q.Int8Dense(*jax.vmap(N.int8_weight)(kernel), **kw)
    elif mode == "fp8":
      new = Q.Fp8Dense(*jax.vmap(N.fp8_weight)(kernel), **kw)
    else:
      amax = jnp.ones(kernel.shape[:2], jnp.float32) if statistics is None else jnp.asarray(statistics[name])
      if amax.shape != kernel.shape[:2]:
        raise SanaError(f"calibration statistics of {name}: shape {amax.shape}, expected {kernel.shape[:2]}")
      new = Q.SVDQuantDense(*_svdquant_layers(kernel, amax, alpha), **kw)
    setattr(parent, leaf, new)
  model.quantization = mode
  return model


@functools.partial(jax.jit, static_argnums=2)
def _svdquant_layers(kernel, amax, alpha):
  """(smooth, down, up, packed int4 residual, its scales) of stacked kernels [L, din, *dout]."""
  rank = N.max_rank(kernel.shape[1], kernel.shape[2:])

  def one(kernel, amax):
    smooth = N.smoothing(amax, kernel, alpha)
    w = kernel.astype(jnp.float32) * smooth.reshape((-1,) + (1,) * (kernel.ndim - 1))
    down, up = N.low_rank(w, rank, kernel.dtype)
    residual = w - N.contract(down.astype(jnp.float32), up.astype(jnp.float32), jnp.float32)
    return (smooth, down, up, *N.int4_weight(residual))

  return jax.vmap(one)(kernel, amax)


def parent_of(blocks, name):
  """(the module holding layer `name` ("attn1.to_q"), the attribute name)."""
  *path, leaf = name.split(".")
  return functools.reduce(getattr, path, blocks), leaf


def layer(blocks, name):
  """The layer `name` of a model's blocks."""
  parent, leaf = parent_of(blocks, name)
  return getattr(parent, leaf)


def weight_bytes(model):
  """Bytes of a model's parameters (abstract or real) as stored."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
