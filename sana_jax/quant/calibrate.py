"""Calibration statistics for W4A4: the largest |input| of every channel of every quantized layer.

The DiT runs block by block (one compiled block, reused for every layer), each quantized layer wrapped
in an Observer that sows the per-channel maxima of its input; the maxima of all calls are kept. The
calls are the caller's: SanaPipeline.quantize feeds the model's inputs along its own sampling paths.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sana_jax.quant import model as quant_model


class Observer(nnx.Module):
  """A layer that records the largest |x| per input channel of each call, then runs as before."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    flat = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    self.sow(nnx.Intermediate, "amax", jnp.max(flat, axis=0))
    return self.layer(x)


class Ranges:
  """Running per-channel input maxima of a float SanaTransformer's quantized layers: `observe` the
  model's calls, then `statistics` {layer name: [layers, din]} for quantize_transformer."""

  def __init__(self, model):
    observed = nnx.clone(model)
    for name in quant_model.ACTIVATION_LAYERS:
      parent, leaf = quant_model.parent_of(observed.blocks, name)
      setattr(parent, leaf, Observer(getattr(parent, leaf)))
    self._model = observed
    self._blocks_graph, self._blocks = nnx.split(observed.blocks)
    self._amax = {}

  def observe(self, x, timestep, encoder_hidden_states, encoder_attention_mask=None):
    """One DiT call's inputs (as SanaTransformer.__call__ takes them); its outputs are not needed."""
    layers = self._model.config.num_layers
    hw = (x.shape[1] // self._model.config.patch_size, x.shape[2] // self._model.config.patch_size)
    h, t6, text = _inputs(*nnx.split(self._model), x, timestep, encoder_hidden_states, encoder_attention_mask)
    for i in range(layers):
      h, sown = _block(self._blocks_graph, self._blocks, i, h, t6, text, hw)
      for path, calls in traverse_util.flatten_dict(sown).items():  # (..., "amax"): a tuple, one per call
        name, value = ".".join(str(p) for p in path[:-1]), functools.reduce(jnp.maximum, calls)
        self._amax.setdefault(name, [None] * layers)
        seen = self._amax[name][i]
        self._amax[name][i] = value if seen is None else jnp.maximum(seen, value)

  def statistics(self):
    return {name: np.stack([np.asarray(v) for v in per_layer])
            for name, per_layer in self._amax.items()}


@functools.partial(jax.jit, static_argnums=0)
def _inputs(graphdef, state, x, timestep, encoder_hidden_states, encoder_attention_mask):
  """What the first block takes: tokens, the time modulation, the text's keys and values."""
  model = nnx.merge(graphdef, state)
  h, _ = model.embed(x)
  return h, model.embed_time(timestep, x.shape[0])[0], model.encode_text(encoder_hidden_states, encoder_attention_mask)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _block(graphdef, stacked, i, h, t6, text, hw):
  """Block i of the stacked blocks on h: (its output, what its Observers sowed)."""
  block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
  out, sown = nnx.capture(block, nnx.Intermediate)(h, t6, (text.keys[i], text.values[i]), text.mask_bias, hw)
  return out, nnx.to_pure_dict(sown)
