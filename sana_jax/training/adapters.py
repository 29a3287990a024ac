"""LoRA training: which kernels a run adapts, its trainable factors, and how they are sharded.

`config.lora = dict(rank=16, alpha=16.0, targets=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0)`
with `config.init_from`: the base transformer is frozen (an input of the jitted step, neither
differentiated nor given optimizer state); the train state's params are the factors alone, so
checkpoints, EMA and resume work as for full training. Targets are peft's target_modules: a diffusers
module name or a dot-bounded tail of one ("to_q" adapts attn1.to_q and attn2.to_q of every block).
Each factor is sharded like its kernel: down keeps the kernel's input axis, up its output axes.
"""
import jax
import numpy as np
from flax import traverse_util

from sana_jax import lora
from sana_jax.convert import diffusers_lora
from sana_jax.errors import SanaError

DEFAULTS = dict(rank=0, alpha=None, targets=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0)  # rank 0: off


def enabled(config):
  return bool((config.get("lora") or {}).get("rank", 0))


class LoraPlan:
  """Built from the run config, the model config and the base model's abstract params and shardings
  (nested dicts, as the Trainer holds them)."""

  def __init__(self, lora_config, model_config, abstract, shardings):
    c = {**DEFAULTS, **dict(lora_config)}
    self.rank = int(c["rank"])
    self.alpha = float(c["alpha"] if c["alpha"] is not None else self.rank)
    self.targets = tuple(c["targets"])
    flat_abstract, flat_shardings = traverse_util.flatten_dict(abstract), traverse_util.flatten_dict(shardings)
    adaptable, refused = _targets(model_config, flat_abstract)
    chosen = lora.select(adaptable, self.targets, refused)
    self.num_layers, self.model_config, self.base_shapes = model_config.num_layers, model_config, flat_abstract
    layers = {}
    for t in chosen:
      layers.setdefault(t.path, set()).add(t.layer)
    scale = self.alpha / self.rank
    self.scales = {p: np.float32(scale) if None in ls else
                   np.array([scale if i in ls else 0.0 for i in range(self.num_layers)], np.float32)
                   for p, ls in sorted(layers.items())}
    self.modules = sorted(t.module for t in chosen)
    self._kernels = {p: flat_abstract[p] for p in self.scales}
    specs = {}
    for p, kernel in self._kernels.items():
      sharding = flat_shardings[p]
      down, up = lora.factor_specs(sharding.spec, self._stacked(p), kernel.ndim)
      specs[(*p, "down")] = jax.sharding.NamedSharding(sharding.mesh, down)
      specs[(*p, "up")] = jax.sharding.NamedSharding(sharding.mesh, up)
    self.shardings = traverse_util.unflatten_dict(specs)

  def _stacked(self, path):
    return np.ndim(self.scales[path]) == 1

  def init(self, key):
    """Fresh factors: the adapted model starts equal to the base (up = 0)."""
    out = {}
    for i, (p, kernel) in enumerate(self._kernels.items()):
      stacked = self._stacked(p)
      shape = kernel.shape[1:] if stacked else kernel.shape
      factors = lora.init_factors(jax.random.fold_in(key, i), shape, self.rank, self.num_layers if stacked else None)
      out[(*p, "down")], out[(*p, "up")] = factors["down"], factors["up"]
    return traverse_util.unflatten_dict(out)

  def adapter(self, params):
    """The trained factors as a sana_jax.lora adapter {path: LoraFactors}."""
    flat = traverse_util.flatten_dict(params)
    return {p: lora.LoraFactors(flat[(*p, "down")], flat[(*p, "up")], s) for p, s in self.scales.items()}

  def merged(self, frozen, params):
    """The base params with the adapter added: what the model computes with."""
    return lora.apply(frozen, [(self.adapter(params), 1.0)])

  def save(self, directory, params, dtype=np.float32):
    """The trained adapter as a diffusers LoRA file (DIR/pytorch_lora_weights.safetensors)."""
    return diffusers_lora.save(directory, self.adapter(params), self.model_config, self.base_shapes, dtype=dtype)


def _targets(model_config, flat_abstract):
  try:
    return diffusers_lora.targets(model_config, flat_abstract)
  except SanaError as e:
    raise SanaError(f"config.lora: {e}") from None
