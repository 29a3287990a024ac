"""Writing export plans to disk: official arrays in the chosen dtype, safetensors files (sharded with an
index above a size, as diffusers and transformers do), config.json, all inside an atomic directory.

Files are `safetensors.numpy` (no torch); a directory appears whole or not at all.
"""
import math
import os

import numpy as np

from sana_jax import dtypes, files
from sana_jax.convert import invert
from sana_jax.errors import SanaError

MAX_SHARD_BYTES = 5 * 10**9  # the shard size the official Sana repositories were written with ("5GB")


def component(model, dtype=None):
  """The export plan of a SanaTransformer, DCAE or GemmaTextEncoder."""
  from sana_jax.convert import diffusers_dcae, diffusers_dit, transformers_gemma
  from sana_jax.models.dcae import DCAE
  from sana_jax.models.dit import SanaTransformer
  from sana_jax.models.gemma import GemmaTextEncoder
  if isinstance(model, SanaTransformer):
    return diffusers_dit.component(model)
  if isinstance(model, DCAE):
    return diffusers_dcae.component(model)
  if isinstance(model, GemmaTextEncoder):
    return transformers_gemma.component(model, dtype)
  raise SanaError(f"cannot export a {type(model).__name__}; expected SanaTransformer, DCAE or GemmaTextEncoder")


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
    if dtype is not None and dtypes.is_float(w.dtype) and w.dtype != dtype:
      with np.errstate(over="ignore"):  # overflow is reported below, by name
        cast = w.astype(dtype)
      if dtype == dtypes.DTYPES["float16"] and not np.isfinite(cast).all() and np.isfinite(w).all():
        raise SanaError(f"weight {e.name} overflows float16; save it as float32 or bfloat16")
      w = cast
    yield e.name, np.ascontiguousarray(w)


def state_dict(model, dtype=None):
  """{official name: numpy array} of a model, as its official loader expects it."""
  return dict(arrays(component(model, dtype), dtype))


def _shards(comp, dtype, max_bytes):
  """Entries split greedily into consecutive shards of at most max_bytes (one tensor may exceed it)."""
  def nbytes(e):
    stored = np.dtype(np.int64) if e.path is None else np.dtype(comp.state[e.path].dtype)
    return math.prod(e.shape) * (dtype.itemsize if dtype is not None and dtypes.is_float(stored) else stored.itemsize)

  shards, size = [[]], 0
  for e in comp.entries:
    n = nbytes(e)
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  return shards


def save_safetensors(path, tensors, metadata):
  """A safetensors file readable by all, as our other outputs (the package writes it 0600)."""
  from safetensors.numpy import save_file
  save_file(tensors, path, metadata=metadata)
  os.chmod(path, 0o644)


def write_weights(directory, comp, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
  """<prefix>.safetensors, or numbered shards and <prefix>.safetensors.index.json, in `directory`."""
  prefix = comp.weights_prefix
  shards = _shards(comp, None if dtype is None else dtypes.resolve(dtype), max_shard_bytes)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = (f"{prefix}.safetensors" if len(shards) == 1 else
            f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = dict(arrays(comp._replace(entries=shard), dtype))
    # transformers refuses safetensors files without this marker
    save_safetensors(os.path.join(directory, name), tensors, {"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    total += sum(a.nbytes for a in tensors.values())
  if len(shards) > 1:
    files.write_json(os.path.join(directory, f"{prefix}.safetensors.index.json"),
                     {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)


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
