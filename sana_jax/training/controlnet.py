"""ControlNet training: a SanaControlNetModel learns to steer a frozen base transformer.

`config.controlnet = dict(num_layers=7, conditioning_scale=1.0)` with `config.init_from` (the base, a
diffusers transformer directory) trains on batches with condition latents (`data.control`, which the
loop sets; precompute writes them with --control edge or --control-images DIR). The model starts as
NVlabs/Sana trains it: its blocks are copies of the base's first `num_layers` blocks, its input and
output projections are zero, so it leaves the base's velocity unchanged until it learns.

What trains: the blocks and the two projections. The patch, time and caption embeddings are the base's
own, frozen and shared, as in the original code, where the ControlNet has no embeddings of its own;
diffusers' SanaControlNetModel stores copies of them, which the export writes. The base is an input of
every step (undonated, no gradient, no optimizer state), as for LoRA; the train state holds the
trained part alone.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax import parallel
from sana_jax.models.controlnet import SanaControlNetModel

DEFAULTS = dict(num_layers=0, conditioning_scale=1.0)  # num_layers 0: off
SHARED = ("patch_embed", "time_embed", "caption_projection", "caption_norm")  # the base's, frozen
ZERO = ("input_block", "controlnet_blocks")


def enabled(config):
  return bool((config.get("controlnet") or {}).get("num_layers", 0))


class ControlNetPlan:
  """The ControlNet's graph, its trained params' abstract tree and shardings, built from the run config
  and the base model's config."""

  def __init__(self, controlnet_config, base_config, mesh, rules, *, dtype, seed, attention_impl="xla"):
    c = {**DEFAULTS, **dict(controlnet_config)}
    self.num_layers, self.conditioning_scale = int(c["num_layers"]), float(c["conditioning_scale"])
    self.model_config = dataclasses.replace(base_config, num_layers=self.num_layers)
    self._make = lambda: SanaControlNetModel(self.model_config, rngs=nnx.Rngs(seed), dtype=dtype,
                                             param_dtype=jnp.float32, attention_impl=attention_impl)
    self.graphdef, abstract = nnx.split(nnx.eval_shape(self._make))
    full = nnx.to_pure_dict(abstract)
    shardings = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, rules))
    self.abstract = {k: v for k, v in full.items() if k not in SHARED}
    self.shardings = {k: v for k, v in shardings.items() if k not in SHARED}

  def init(self):
    """Fresh trained params (random blocks, zero projections): the shapes of a run's state."""
    full = nnx.to_pure_dict(nnx.state(self._make()))
    return {k: full[k] for k in self.abstract}

  def from_base(self, base):
    """The trained params a run starts from: the base's first blocks, zero projections."""
    out = {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract[k]) for k in ZERO}
    out["blocks"] = jax.tree.map(lambda a: a[:self.num_layers], base["blocks"])
    return out

  def full(self, base, params):
    """The whole ControlNet's params: the trained ones with the base's embeddings."""
    return {**{k: base[k] for k in SHARED}, **params}

  def model(self, base, params):
    return nnx.merge(self.graphdef, self.full(base, params))

  def residuals(self, base, params, x_t, timesteps, y, mask, control):
    """The residuals the base adds after its blocks 1 .. num_layers."""
    return self.model(base, params)(x_t, timesteps, y, mask, controlnet_cond=control,
                                    conditioning_scale=self.conditioning_scale)
