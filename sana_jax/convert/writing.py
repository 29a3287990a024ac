"""Writing export plans to disk: official arrays in the chosen dtype, safetensors files (sharded with an
index above a size, as diffusers and transformers do), config.json, all inside an atomic directory.

Files are written one tensor at a time (safetensors_io.write_file, no torch); a directory appears whole or
not at all.
"""
import math
import os

import jax
import numpy as np

from sana_jax import dtypes, files
from sana_jax.convert import invert, safetensors_io
from sana_jax.errors import SanaError

MAX_SHARD_BYTES = 5 * 10**9  # the shard size the official Sana repositories were written with ("5GB")


def component(model, dtype=None):
  """The export plan of a SanaTransformer, DCAE or GemmaTextEncoder."""
  from sana_jax.convert import diffusers_controlnet, diffusers_dcae, diffusers_dit, transformers_gemma
  from sana_jax.models.controlnet import SanaControlNetModel
  from sana_jax.models.dcae import DCAE
  from sana_jax.models.dit import SanaTransformer
  from sana_jax.models.gemma import GemmaTextEncoder
  if isinstance(model, SanaControlNetModel):  # before SanaTransformer, its base class
    return diffusers_controlnet.component(model)
  if isinstance(model, SanaTransformer):
    return diffusers_dit.component(model)
  if isinstance(model, DCAE):
    return diffusers_dcae.component(model)
  if isinstance(model, GemmaTextEncoder):
    return transformers_gemma.component(model, dtype)
  raise SanaError(f"cannot export a {type(model).__name__}; expected SanaTransformer, SanaControlNetModel, DCAE or "
                  f"GemmaTextEncoder")


def _host(array, name):
  if not getattr(array, "is_fully_addressable", True):
    raise SanaError(f"parameter {name} is sharded across processes; gather it to one host before saving")
  return np.asarray(array)


def arrays(comp, dtype=None):
  """Yields (official name, contiguous numpy array) in entry order; each stacked parameter is
  brought to the host once. Floating arrays are cast to `dtype` (None keeps them as they are)."""
  dtype = None if dtype is None else dtypes.resolve(dtype)
  cached = (None, None)
  for e in comp.entries:
    if e.path is None:
      yield e.name, e.transform.inverse(None, comp.model_config)
      continue
    if cached[0] != e.path:
      cached = (e.path, _host(comp.state[e.path], e.name))
    w = e.transform.inverse(cached[1] if e.layer is None else cached[1][e.layer], comp.model_config)
    yield e.name, np.ascontiguousarray(cast(w, None if e.name in comp.exact else dtype, e.name))


def cast(w, dtype, name):
  """A floating array `w` in `dtype` (None: as it is); a weight that overflows float16 is an error naming it."""
  if dtype is None or not dtypes.is_float(w.dtype) or w.dtype == dtype:
    return w
  with np.errstate(over="ignore"):  # overflow is reported below, by name
    out = w.astype(dtype)
  if dtype == dtypes.DTYPES["float16"] and not np.isfinite(out).all() and np.isfinite(w).all():
    raise SanaError(f"weight {name} overflows float16; save it as float32 or bfloat16")
  return out


def state_dict(model, dtype=None):
  """{official name: numpy array} of a model, as its official loader expects it."""
  return dict(arrays(component(model, dtype), dtype))


def out_dtype(stored, dtype):
  """The dtype `cast` gives an array stored as `stored`."""
  return np.dtype(dtype if dtype is not None and dtypes.is_float(stored) else stored)


def _official_shape(comp, e):
  if e.path is None:
    return np.shape(e.transform.inverse(None, comp.model_config))
  inverse = lambda w: e.transform.inverse(w, comp.model_config)
  return jax.eval_shape(inverse, jax.ShapeDtypeStruct(e.shape, np.float32)).shape


def specs(comp, dtype=None):
  """[(official name, dtype, shape)] of what `arrays(comp, dtype)` yields, without making an array."""
  dtype = None if dtype is None else dtypes.resolve(dtype)
  stored = lambda e: np.int64 if e.path is None else comp.state[e.path].dtype
  return [(e.name, out_dtype(stored(e), None if e.name in comp.exact else dtype), _official_shape(comp, e))
          for e in comp.entries]


def write_tensors(directory, prefix, specs, arrays, max_shard_bytes=MAX_SHARD_BYTES, metadata=None):
  """<prefix>.safetensors in `directory`, or numbered shards of at most max_shard_bytes (one tensor may
  exceed it) and <prefix>.safetensors.index.json, as diffusers and transformers write them. `arrays`
  yields (name, array) in the order of `specs` [(name, dtype, shape)]; one tensor is in memory at a time."""
  shards, size = [[]], 0
  for spec in specs:
    n = math.prod(spec[2]) * np.dtype(spec[1]).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  arrays, weight_map, total = iter(arrays), {}, 0
  for i, shard in enumerate(shards):
    name = (f"{prefix}.safetensors" if len(shards) == 1 else
            f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    # transformers refuses safetensors files without the format marker
    total += safetensors_io.write_file(os.path.join(directory, name), shard, arrays, metadata or {"format": "pt"})
    weight_map.update(dict.fromkeys((spec[0] for spec in shard), name))
  if len(shards) > 1:
    files.write_json(os.path.join(directory, f"{prefix}.safetensors.index.json"),
                     {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)


def save_safetensors(path, tensors, metadata):
  """One safetensors file of {name: array}, readable by all, as our other outputs."""
  safetensors_io.write_file(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], iter(tensors.items()),
                            metadata)


def write_weights(directory, comp, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
  """A component's weights in `directory`, sharded above max_shard_bytes (write_tensors)."""
  write_tensors(directory, comp.weights_prefix, specs(comp, dtype), arrays(comp, dtype), max_shard_bytes)


def library_header(class_name):
  """The `_class_name` / `_diffusers_version` fields diffusers writes at the top of its configs."""
  return {"_class_name": class_name, "_diffusers_version": invert.package_version("diffusers", "0.33.0")}


def write_component(directory, comp, dtype, max_shard_bytes=MAX_SHARD_BYTES):
  """config.json and the weights of one component into `directory` (created)."""
  os.makedirs(directory, exist_ok=True)
  header = library_header(comp.class_name) if comp.library == "diffusers" else {}
  files.write_json(os.path.join(directory, "config.json"), {**header, **comp.config}, sort_keys=True)
  write_weights(directory, comp, dtype, max_shard_bytes)


def holds_saved_model(directory):
  """An existing directory may be replaced by a save only when it is empty or holds a saved model."""
  names = set(os.listdir(directory))
  if names and not names & {"config.json", "model_index.json"}:
    raise SanaError(f"cannot save to {directory}: it is a non-empty directory that holds no saved model")


def save_pretrained(model, directory, dtype="float32", *, max_shard_bytes=MAX_SHARD_BYTES):
  """Writes `model` (SanaTransformer, DCAE or GemmaTextEncoder) as an official component directory:
  config.json and safetensors weights in `dtype` (float32, bfloat16, float16; None keeps each
  parameter's own dtype)."""
  comp = component(model, dtype)
  with files.atomic_directory(directory, holds_saved_model) as tmp:
    write_component(tmp, comp, dtype, max_shard_bytes)
