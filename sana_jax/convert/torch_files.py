"""Reads PyTorch checkpoint files (torch.save) into memory-mapped numpy arrays, without torch and without
running the file's pickle.

torch.load unpickles, and unpickling calls whatever functions the file names: a downloaded .pth can run
any command. This library never imports torch, so it reads the two formats torch.save writes itself:
the zip archive (<root>/data.pkl plus one stored entry per storage, <root>/data/<key>) and the legacy
stream (magic, protocol, sys info and main pickles, the storage keys, then each storage's element count
and bytes). The pickle goes through an unpickler that knows only collections.OrderedDict, torch's tensor
and parameter rebuild functions (answered by functions here that build numpy views), and torch's storage
type names (DTYPES); any other global (os.system, builtins.eval, a torch.nn module, ...) is refused by
name before anything is called. A tensor's untrusted size, stride and offset must stay inside its
storage; arrays are read-only views of a memory map of the file, shared storages included. Every
problem is a one-line SanaError naming the file.
"""
import collections
import io
import math
import os
import pickle
import zipfile
import zlib

import ml_dtypes
import numpy as np

from sana_jax import files
from sana_jax.errors import SanaError, one_line, short

MAX_PICKLE_BYTES = 1 << 30  # data.pkl of the largest released checkpoints is a few hundred KB
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
DTYPES = {  # torch storage classes (torch.FloatStorage, ...) -> numpy dtypes
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_DAMAGED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            RecursionError, MemoryError, OverflowError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError)  # zipfile: an entry flagged encrypted


class _Closed:
  """Base of the objects the pickle gets from us: a BUILD opcode cannot set attributes on them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"the pickle tries to set the state of {self}")


class _Global(_Closed):
  """An allowed global: calls `call`; a storage type (`dtype` set) is never called."""
  __slots__ = ("name", "call", "dtype")

  def __init__(self, name, call=None, dtype=None):
    self.name, self.call, self.dtype = name, call, dtype

  def __call__(self, *args):
    if self.call is None:
      raise pickle.UnpicklingError(f"the pickle calls the storage type {self.name}")
    return self.call(*args)

  def __repr__(self):
    return self.name


class _Storage(_Closed):
  __slots__ = ("array",)  # 1-D array of the storage's dtype; None while the legacy format is first scanned

  def __init__(self, array):
    self.array = array

  def __repr__(self):
    return "a storage"


def _tensor(storage, offset, size, stride, *ignored):  # requires_grad, backward_hooks, metadata
  """torch._utils._rebuild_tensor(_v2) answered with a view of the storage, after checking its bounds."""
  ints = lambda t: isinstance(t, tuple) and all(type(i) is int and i >= 0 for i in t)
  if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
    raise ValueError(f"a tensor has a bad storage or offset ({type(storage).__name__}, {offset!r})")
  if not ints(size) or not ints(stride) or len(size) != len(stride):
    raise ValueError(f"a tensor has bad size {one_line(size, 80)} or stride {one_line(stride, 80)}")
  data = storage.array
  if data is None or 0 in size:
    return None if data is None else data[:0].reshape(size)
  end = offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1
  if end > data.size:
    raise ValueError(f"a tensor of size {size}, stride {stride}, offset {offset} runs past its storage of "
                     f"{data.size} elements")
  if all(d == 1 or s == math.prod(size[i + 1:]) for i, (d, s) in enumerate(zip(size, stride))):
    return data[offset:offset + math.prod(size)].reshape(size)
  strides = tuple(s * data.itemsize for s in stride)
  return np.lib.stride_tricks.as_strided(data[offset:], size, strides, writeable=False)


def _parameter(data, *ignored):  # requires_grad, backward_hooks(, state)
  if data is not None and not isinstance(data, np.ndarray):
    raise ValueError(f"a parameter holds a {type(data).__name__}, not a tensor")
  return data


_CALLS = {"collections.OrderedDict": collections.OrderedDict, "torch._utils._rebuild_tensor": _tensor,
          "torch._utils._rebuild_tensor_v2": _tensor, "torch._utils._rebuild_parameter": _parameter,
          "torch._utils._rebuild_parameter_with_state": _parameter}


class _Unpickler(pickle.Unpickler):
  """Knows only the globals above; `storage(key, dtype, numel)` is the raw uint8 array of a storage (or None)."""

  def __init__(self, file, path, storage=None):
    super().__init__(file)
    self.path, self.storage = path, storage

  def find_class(self, module, name):
    full = f"{module}.{name}"
    if full in _CALLS:
      return _Global(full, call=_CALLS[full])
    if module in ("torch", "torch.cuda") and name in DTYPES:
      return _Global(full, dtype=np.dtype(DTYPES[name]))
    raise SanaError(f"{self.path}: refuses to load: the pickle calls {one_line(full, 100)}, which a checkpoint of "
                    f"tensors never needs")

  def persistent_load(self, pid):
    if (self.storage is None or not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _Global) or pid[1].dtype is None or not isinstance(pid[2], str)
        or type(pid[4]) is not int or pid[4] < 0 or pid[5:] not in ((), (None,))):
      raise ValueError(f"unexpected persistent id {one_line(pid, 100)}")
    dtype, key, numel = pid[1].dtype, pid[2], pid[4]
    raw = self.storage(key, dtype, numel)
    if raw is None:
      return _Storage(None)
    if raw.size < numel * dtype.itemsize:
      raise ValueError(f"storage {short(key)} holds {raw.size} bytes, fewer than {numel} x {dtype}")
    return _Storage(raw[:numel * dtype.itemsize].view(dtype))


def load(path):
  """The object a torch.save file holds (typically {"state_dict": {name: tensor}} or a flat {name: tensor}),
  with every tensor as a read-only numpy array that is a view of a memory map of the file (no copy)."""
  files.regular_file(path, "checkpoint")
  try:
    with open(path, "rb") as f:
      head = f.read(512)
      if head[257:262] == b"ustar":
        raise SanaError(f"{path}: an old tar-format torch.save file; load and re-save it with torch >= 1.6")
      if zipfile.is_zipfile(f) or head.startswith(b"PK\x03\x04"):
        return _load_zip(path, f)
      if head[:1] == b"\x80":  # a pickle's PROTO opcode: the legacy format's magic number
        return _load_legacy(path, f)
  except _DAMAGED as e:
    raise SanaError(f"{path}: damaged checkpoint ({type(e).__name__}: {one_line(e, 200)})") from None
  except OSError as e:
    raise SanaError(f"{path}: damaged or unreadable checkpoint ({e.strerror or one_line(e)})") from None
  raise SanaError(f"{path} is neither a PyTorch zip checkpoint nor a legacy torch.save file")


def _load_zip(path, f):
  with zipfile.ZipFile(f) as z:
    pickles = [i for i in z.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise SanaError(f"{path}: a zip with {len(pickles)} */data.pkl entries, not a PyTorch checkpoint")
    root, entries = pickles[0].filename[:-len("/data.pkl")], {i.filename: i for i in z.infolist()}
    if f"{root}/byteorder" in entries and z.read(f"{root}/byteorder").strip() != b"little":
      raise SanaError(f"{path}: a big-endian checkpoint; only little-endian files are read")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
      raise SanaError(f"{path}: data.pkl is {pickles[0].file_size} bytes, over the cap of {MAX_PICKLE_BYTES}")
    mapped, size = None, os.fstat(f.fileno()).st_size

    def storage(key, dtype, numel):
      nonlocal mapped
      info = entries.get(f"{root}/data/{key}")
      if info is None:
        raise SanaError(f"{path}: the pickle names storage {short(key)}, which the archive lacks")
      if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(z.read(info), np.uint8)
      f.seek(info.header_offset)
      local = f.read(30)
      if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
      start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
      if start + info.file_size > size:
        raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
      if mapped is None:
        mapped = np.memmap(path, np.uint8, mode="r")
      return mapped[start:start + info.file_size]

    return _Unpickler(io.BytesIO(z.read(pickles[0])), path, storage).load()  # z.read checks the CRC


def _load_legacy(path, f):
  f.seek(0)
  if _Unpickler(f, path).load() != LEGACY_MAGIC:
    raise SanaError(f"{path} is neither a PyTorch zip checkpoint nor a legacy torch.save file")
  _Unpickler(f, path).load()  # protocol version
  sys_info = _Unpickler(f, path).load()
  if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
    raise SanaError(f"{path}: a big-endian checkpoint; only little-endian files are read")
  start, dtypes = f.tell(), {}

  def record(key, dtype, numel):  # a first pass learns each storage's dtype, hence its length in bytes
    dtypes.setdefault(key, dtype)

  _Unpickler(f, path, record).load()
  keys = _Unpickler(f, path).load()
  if not isinstance(keys, list) or not all(k in dtypes for k in keys):
    raise ValueError("the storage key list does not match the storages the pickle names")
  at, size, spans = f.tell(), os.fstat(f.fileno()).st_size, {}
  for key in keys:
    f.seek(at)
    count = int.from_bytes(f.read(8).ljust(8, b"\xff"), "little")
    at, spans[key] = at + 8 + count * dtypes[key].itemsize, (at + 8, count * dtypes[key].itemsize)
    if at > size:
      raise SanaError(f"{path}: storage {short(key)} runs past the end of the file; truncated")
  mapped = np.memmap(path, np.uint8, mode="r")

  def storage(key, dtype, numel):
    if key not in spans:
      raise SanaError(f"{path}: the pickle names storage {short(key)}, which the file lacks")
    return mapped[spans[key][0]:sum(spans[key])]

  f.seek(start)
  return _Unpickler(f, path, storage).load()
