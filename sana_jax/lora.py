"""LoRA adapters as data: low-rank factors beside the DiT's kernels, applied by one pure function.

An adapter maps the path of a kernel in the DiT's params (e.g. ("blocks", "attn1", "to_q", "kernel"))
to `LoraFactors(down [(L,) din, r], up [(L,) r, *dout], scale [(L,)])`; the kernel in use is
kernel + weight * scale * down @ up. Kernels of the scanned blocks carry a leading layers axis, and so
do their factors: a layer the adapter does not touch has scale 0 (and zero factors); smaller ranks
are zero-padded to the largest, which changes nothing. Factors are float32 and the sum is formed in
float32, then cast to the kernel's dtype.

`apply` runs inside jitted code with the factors and weights as arrays, so a new weight or scale
never retraces; fusing is the same function run once on the stored weights. Module names, the files
they come in and their layouts are `sana_jax.convert.diffusers_lora`'s business.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sana_jax.errors import SanaError, short


class LoraFactors(NamedTuple):
  down: Any   # [(L,) din, r]
  up: Any     # [(L,) r, *dout]
  scale: Any  # [(L,)] float32: alpha / r per layer, 0 where the layer is not adapted


def delta(f):
  """scale * down @ up in float32, shaped like the kernel it adapts."""
  down, up = jnp.asarray(f.down, jnp.float32), jnp.asarray(f.up, jnp.float32)
  stacked = down.ndim == 3
  d = jnp.einsum("lir,lr...->li..." if stacked else "ir,r...->i...", down, up)
  scale = jnp.asarray(f.scale, jnp.float32)
  return d * scale.reshape(scale.shape + (1,) * (d.ndim - scale.ndim))


def apply(params, weighted):
  """params (a nested dict of arrays, or an nnx.State: a nested dict comes back) with every adapter of
  `weighted` ([(adapter, weight)]) added to its kernels, each kernel keeping its dtype."""
  if not weighted:
    return params
  from flax import nnx
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
  sums = {}
  for adapter, weight in weighted:
    for path, f in adapter.items():
      sums[path] = sums.get(path, 0.0) + jnp.asarray(weight, jnp.float32) * delta(f)
  for path, d in sums.items():
    kernel = flat[path]
    flat[path] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


# ---- training: trainable factors for the kernels a config names


class Target(NamedTuple):
  """A kernel LoRA can adapt: its params path, the layer (None: not stacked), and its diffusers module."""
  path: tuple
  layer: int | None
  module: str


def matches(module, pattern):
  """peft's target_modules rule: the module's full name, or a suffix of it at a dot boundary."""
  return module == pattern or module.endswith("." + pattern)


def select(targets, patterns, refused=()):
  """The Targets whose module one of `patterns` names; SanaError for a pattern that names none (or
  only modules in `refused` {module: why LoRA cannot adapt it})."""
  chosen = []
  for pattern in patterns:
    hits = [t for t in targets if matches(t.module, pattern)]
    if not hits:
      why = next((f": {why}" for module, why in refused.items() if matches(module, pattern)), "")
      raise SanaError(f"config.lora.targets: {short(pattern)} names no layer LoRA can adapt{why}")
    chosen += [t for t in hits if t not in chosen]
  return chosen


def init_factors(key, kernel_shape, rank, layers):
  """Fresh trainable factors as peft draws them: down ~ U(+-1/sqrt(din)) (kaiming-uniform, a=sqrt(5)),
  up = 0, so the adapted model starts equal to the base. kernel_shape without the layers axis."""
  din, dout = kernel_shape[0], kernel_shape[1:]
  lead = () if layers is None else (layers,)
  bound = 1.0 / np.sqrt(din)
  down = jax.random.uniform(key, (*lead, din, rank), jnp.float32, -bound, bound)
  return {"down": down, "up": jnp.zeros((*lead, rank, *dout), jnp.float32)}


def factor_specs(kernel_spec, stacked, kernel_ndim):
  """PartitionSpecs of (down, up) from their kernel's: down keeps the kernel's input axis, up its
  output axes, the rank axis is whole (a rank-16 axis is not worth splitting)."""
  spec = tuple(kernel_spec) + (None,) * (kernel_ndim - len(kernel_spec))
  lead, spec = (spec[:1], spec[1:]) if stacked else ((), spec)
  P = jax.sharding.PartitionSpec
  return P(*lead, spec[0], None), P(*lead, None, *spec[1:])
