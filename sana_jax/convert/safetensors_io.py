"""Reads safetensors files (single, or sharded with an index) into memory-mapped numpy arrays, and
writes them one tensor at a time.

Parsed here rather than by the `safetensors` package for two reasons: arrays stay read-only views of
a memory map until the converter touches them (a 1.6B checkpoint is not copied twice), and every
problem is named by file and tensor. The header is validated whole before any data is touched, at
least as strictly as the package does: length within the file and under a cap, a JSON object, known
dtypes, non-negative integer shapes, integer offsets that tile the data section exactly (in bounds,
begin <= end, no overlaps, no gaps) and byte counts equal to prod(shape) * itemsize. A file whose
header lies is a SanaError, never silently different weights.
"""
import json
import math
import os

import ml_dtypes
import numpy as np

from sana_jax import files
from sana_jax.errors import SanaError, short

MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own cap
DTYPES = {  # safetensors dtype codes
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,  # quantized transformers' fp8 kernels
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path):
  """(header {name: {dtype, shape, data_offsets}}, metadata {str: str}, data offset) of a validated file."""
  files.regular_file(path, "weights file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SanaError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    n = int.from_bytes(head, "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
      raise SanaError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes); truncated or not "
                      f"a safetensors file")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
    raise SanaError(f"{path}: safetensors header is not valid JSON; damaged or not a safetensors file") from None
  if not isinstance(header, dict):
    raise SanaError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise SanaError(f"{path}: safetensors __metadata__ must map strings to strings")
  _check_tensors(path, header, size - 8 - n)
  return header, metadata, 8 + n


def _check_tensors(path, header, data_bytes):
  spans = []
  for name, info in header.items():
    where = f"{path}: tensor {short(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
      raise SanaError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    if info["dtype"] not in DTYPES:
      raise SanaError(f"{where}: unsupported dtype {short(info['dtype'])}; expected one of {sorted(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
      raise SanaError(f"{where}: shape {short(shape)} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]):
      raise SanaError(f"{where}: data_offsets {short(offsets)} are not two integers 0 <= begin <= end")
    if offsets[1] > data_bytes:
      raise SanaError(f"{where}: data_offsets {offsets} run past the end of the data section ({data_bytes} "
                      f"bytes); the file is truncated or its header lies")
    expected = math.prod(shape) * np.dtype(DTYPES[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != expected:
      raise SanaError(f"{where}: holds {offsets[1] - offsets[0]} bytes, but shape {shape} of {info['dtype']} "
                      f"needs {expected}")
    spans.append((offsets[0], offsets[1], name))
  end = 0
  for begin, stop, name in sorted(spans):
    if begin != end:
      what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes before it"
      raise SanaError(f"{path}: tensor {short(name)} {what}; the header's offsets are inconsistent")
    end = stop
  if end != data_bytes:
    raise SanaError(f"{path}: the tensors cover {end} of the data section's {data_bytes} bytes; truncated or damaged")


def read_file(path):
  """{name: np.ndarray} for one .safetensors file; arrays are read-only views of a memory map."""
  header, _, offset = read_header(path)
  if not header:
    return {}
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
  out = {}
  for name, info in header.items():
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(np.dtype(DTYPES[info["dtype"]])).reshape(info["shape"])
  return out


def read_dir(directory, prefix):
  """All tensors of `prefix`.safetensors, or of the shards its `prefix`.safetensors.index.json names
  (each inside `directory`, each tensor in the shard the index says, none twice)."""
  directory = os.fspath(directory)
  single = files.inside(directory, f"{prefix}.safetensors", "weights file")
  index_path = files.inside(directory, f"{prefix}.safetensors.index.json", "shard index")
  if os.path.lexists(single):
    return read_file(single)
  if not os.path.lexists(index_path):
    raise SanaError(f"{directory}: no {prefix}.safetensors or {prefix}.safetensors.index.json")
  weight_map = files.read_json(index_path, "shard index").get("weight_map")
  if (not isinstance(weight_map, dict) or not weight_map
      or not all(isinstance(v, str) for v in weight_map.values())):
    raise SanaError(f"{index_path}: weight_map must be a non-empty object of tensor name -> shard file")
  out = {}
  for shard in sorted(set(weight_map.values())):
    tensors = read_file(files.inside(directory, shard, "shard"))
    for name, array in tensors.items():
      if name in out:
        raise SanaError(f"{index_path}: tensor {short(name)} is stored in more than one shard")
      if weight_map.get(name) != shard:
        raise SanaError(f"{index_path}: tensor {short(name)} is in {shard} but the index does not say so")
      out[name] = array
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise SanaError(f"{index_path}: {len(missing)} tensor(s) the index names are in no shard, e.g. {short(missing[0])}")
  return out


def write_file(path, specs, arrays, metadata=None):
  """Writes a new .safetensors file (readable by all) one tensor at a time, so no model is ever held
  whole: `specs` [(name, dtype, shape)] make the header, then `arrays` (an iterator, which may go on to
  the next file's tensors) yields (name, array) in the same order; each is written before the next is
  made. Returns the bytes of tensor data written."""
  header, offset = {}, 0
  for name, dtype, shape in specs:
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps({"__metadata__": metadata, **header} if metadata else header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the package writes it
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  os.fchmod(fd, 0o644)  # whatever the umask: a model directory is for others to read
  with os.fdopen(fd, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw)
    for name, dtype, shape in specs:
      got, array = next(arrays)
      if got != name or array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise ValueError(f"tensor {got} {array.dtype}{array.shape} written where the header says {name} "
                         f"{np.dtype(dtype)}{tuple(shape)}")
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  return offset
