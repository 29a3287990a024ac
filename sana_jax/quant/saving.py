"""Quantized transformer directories: diffusers' config.json plus a `quantization_config`, and the
parameters under our own names ("blocks.attn1.to_q.kernel", stacked over layers) in safetensors: int8,
uint8 (packed int4) and F8_E4M3 kernels, float32 scales and smoothing factors, 16-bit low-rank factors
and every unquantized weight. Loading rebuilds the quantized model from the config and fills it; no
calibration runs again.

diffusers has no reader for this method: its loader refuses the unknown `quant_method` rather than
misreading the weights.
"""
import numpy as np
from flax import nnx

from sana_jax import dtypes
from sana_jax.convert import diffusers_dit, invert, loading, safetensors_io
from sana_jax.convert.table import IDENTITY
from sana_jax.errors import SanaError, short
from sana_jax.quant import model as quant_model

QUANT_METHOD = "sana_jax"
FORMAT_VERSION = 1
WEIGHTS_PREFIX = "diffusion_pytorch_model"


def config_entry(mode):
  """config.json's `quantization_config` for a model quantized to `mode`."""
  return {"quant_method": QUANT_METHOD, "mode": mode, "format_version": FORMAT_VERSION}


def read_mode(raw, source):
  """The mode a config's `quantization_config` names (None when it has none); SanaError for one this
  version cannot load."""
  entry = raw.get("quantization_config")
  if entry is None:
    return None
  if (not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD
      or entry.get("format_version") != FORMAT_VERSION or entry.get("mode") not in quant_model.MODES):
    raise SanaError(f"{source}: quantization_config {short(entry)} is not one sana-jax can load (expected "
                    f"quant_method {QUANT_METHOD!r}, format_version {FORMAT_VERSION}, mode one of "
                    f"{', '.join(quant_model.MODES)})")
  return entry["mode"]


def component(model):
  """The export plan of a quantized SanaTransformer: every parameter under its own name."""
  cfg = model.config
  state = invert.flat_state(model)
  entries = [invert.Entry(".".join(path), path, None, IDENTITY, array.shape) for path, array in state.items()]
  exact = frozenset(e.name for e in entries if not dtypes.is_float(state[e.path].dtype)
                    or e.name.endswith(("kernel_scale", "smooth")))
  config = {**diffusers_dit.config_json(cfg), "quantization_config": config_entry(quant_model.mode_of(model))}
  return invert.Component(config, cfg, entries, state, WEIGHTS_PREFIX, "diffusers", diffusers_dit.CLASS_NAME, exact)


def load(path, cfg, mode, *, dtype, param_dtype, attention_impl="xla", mesh=None, rules=None):
  """The quantized SanaTransformer saved in `path` (config `cfg`, `mode`). Float parameters are cast to
  `param_dtype` (scales and smoothing factors stay float32); quantized kernels must be stored in their
  own dtype and shape."""
  from sana_jax.models.dit import SanaTransformer
  quant_model.check_backend(mode)
  dtype, param_dtype = dtypes.resolve(dtype), dtypes.resolve(param_dtype)
  build = lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl)
  abstract = quant_model.abstract_quantized(build, mode)
  expected = loading.abstract_leaves(abstract)
  stored = safetensors_io.read_dir(path, WEIGHTS_PREFIX)
  names = {".".join(k): k for k in expected}
  unknown, missing = sorted(set(stored) - set(names)), sorted(set(names) - set(stored))
  if unknown or missing:
    what = f"unexpected tensor {short(unknown[0])}" if unknown else f"missing tensor {short(missing[0])}"
    raise SanaError(f"{path}: {what} for a {mode} transformer of this config")
  weights = {}
  for name, key in names.items():
    want, got = expected[key], stored[name]
    if tuple(got.shape) != tuple(want.shape):
      raise SanaError(f"{path}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if dtypes.is_float(want.dtype) != dtypes.is_float(got.dtype) or (
        not dtypes.is_float(want.dtype) and np.dtype(got.dtype) != np.dtype(want.dtype)):
      raise SanaError(f"{path}: tensor {name} is {np.dtype(got.dtype).name}, expected {np.dtype(want.dtype).name}")
    weights[key] = got
  return loading.fill(abstract, weights, mesh, rules)
