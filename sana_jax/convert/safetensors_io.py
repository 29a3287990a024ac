"""Reads safetensors files (single or sharded with an index) into numpy arrays, memory-mapped.

Parsed by hand (8-byte header length, JSON header, raw little-endian data) so bfloat16 comes out
as ml_dtypes.bfloat16 without going through torch.
"""
import json
import os

import ml_dtypes
import numpy as np

from sana_jax.errors import SanaError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_file(path):
  """{name: np.ndarray} for one .safetensors file; arrays are read-only views of a memory map."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise SanaError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dt = np.dtype(_DTYPES[info["dtype"]])
    out[name] = data[start:end].view(dt).reshape(info["shape"])
  return out


def read_dir(directory, prefix):
  """All tensors of `prefix`.safetensors, or of the shards its `prefix`.safetensors.index.json names."""
  single = os.path.join(directory, f"{prefix}.safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    return read_file(single)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(read_file(os.path.join(directory, shard)))
    return out
  raise SanaError(f"{directory}: no {prefix}.safetensors or {prefix}.safetensors.index.json")
