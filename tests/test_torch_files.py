"""torch_files.load: torch.save files of both formats read back exactly as read-only views of a memory map,
and anything but tensors in containers (a command, a module object, a damaged or crafted file) is a one-line
SanaError, with nothing run."""
import collections
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from sana_jax.convert import torch_files
from sana_jax.errors import SanaError

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False},
           "zip-protocol-4": {"pickle_protocol": 4},
           "legacy-protocol-4": {"_use_new_zipfile_serialization": False, "pickle_protocol": 4}}


def save(obj, path, fmt="zip"):
  torch.save(obj, path, **FORMATS[fmt])
  return str(path)


def mapped(array):
  """Whether `array` is a view (through any chain of bases) of a numpy memory map."""
  while array is not None:
    if isinstance(array, np.memmap):
      return True
    array = getattr(array, "base", None)
  return False


def check(array, tensor):
  assert isinstance(array, np.ndarray) and not array.flags.writeable and mapped(array)
  assert array.shape == tuple(tensor.shape)
  if tensor.dtype == torch.bfloat16:
    assert array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(array.astype(np.float32), tensor.float().numpy())
  else:
    assert array.dtype == tensor.numpy().dtype
    np.testing.assert_array_equal(array, tensor.numpy())


def one_line_error(path, match):
  with pytest.raises(SanaError, match=match) as e:
    torch_files.load(path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)
  return str(e.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 4, generator=g)
  parts = torch.chunk(base, 3)
  module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
  tensors = {
      "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(4, generator=g).half(),
      "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(-3, 7), "bool": torch.rand(5) > 0.5,
      "f64": torch.randn(2, dtype=torch.float64), "i8": torch.tensor([-1, 2], dtype=torch.int8),
      "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "transposed": base.t(),
      "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
  }
  obj = {"tensors": tensors, "parts": list(parts), "whole": base, "tail": base[2:],
         "state_dict": module.state_dict(), "meta": {"step": 7, "lr": 1e-4, "name": "sana", "none": None,
                                                     "tuple": (1, "a", [2.5, None])}}
  out = torch_files.load(save(obj, tmp_path / "ckpt.pth", fmt))
  for name, tensor in tensors.items():
    check(out["tensors"][name], tensor.detach())
  assert not out["tensors"]["transposed"].flags.c_contiguous
  for array, tensor in zip(out["parts"], parts):
    check(array, tensor)
  check(out["whole"], base)
  check(out["tail"], base[2:])
  assert np.shares_memory(out["whole"], out["tail"]) and np.shares_memory(out["whole"], out["parts"][1])
  state = out["state_dict"]
  assert isinstance(state, collections.OrderedDict) and list(state) == list(module.state_dict())
  assert state._metadata == module.state_dict()._metadata
  for name, tensor in module.state_dict().items():
    check(state[name], tensor)
  assert out["meta"] == obj["meta"]


def test_flat_and_compressed_entries(tmp_path):
  """A flat state dict; an archive whose entries were re-written deflated still reads (into memory)."""
  tensors = {"a": torch.arange(12.).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
  path = save(tensors, tmp_path / "flat.pth")
  out = torch_files.load(path)
  assert set(out) == {"a", "b"} and all(check(out[k], t) is None for k, t in tensors.items())
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
      dst.writestr(info.filename, src.read(info))
  out = torch_files.load(tmp_path / "deflated.pth")
  np.testing.assert_array_equal(out["a"], tensors["a"].numpy())
  assert not out["a"].flags.writeable


def test_never_imports_torch(tmp_path):
  path = save({"w": torch.ones(2)}, tmp_path / "w.pth")
  code = (f"import sys; from sana_jax.convert import torch_files; torch_files.load({path!r}); "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class RunsCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_command_is_refused_and_never_run(tmp_path, fmt):
  marker = tmp_path / "pwned"
  path = save({"w": torch.ones(2), "x": RunsCommand(marker)}, tmp_path / "evil.pth", fmt)
  message = one_line_error(path, "refuses to load")
  assert f"calls {os.system.__module__}.system" in message
  assert not marker.exists()


@pytest.mark.parametrize("obj, name", [(torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
                                       (collections.Counter("ab"), "collections.Counter"),
                                       (np.ones(2), "numpy.")])
def test_unknown_globals_are_refused(tmp_path, obj, name):
  one_line_error(save({"obj": obj}, tmp_path / "obj.pth"), f"refuses to load: the pickle calls {name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated(tmp_path, fmt):
  data = open(save({"w": torch.randn(64, 64)}, tmp_path / "full.pth", fmt), "rb").read()
  (tmp_path / "half.pth").write_bytes(data[:len(data) // 2])
  one_line_error(tmp_path / "half.pth", "damaged|truncated")


def test_not_checkpoints(tmp_path):
  (tmp_path / "text.pth").write_text("hello, I am not a checkpoint\n")
  (tmp_path / "empty.pth").write_bytes(b"")
  for name in ("text.pth", "empty.pth"):
    one_line_error(tmp_path / name, "neither a PyTorch zip checkpoint nor a legacy torch.save file")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("archive/readme.txt", "no pickle here")
  one_line_error(tmp_path / "other.zip", "0 \\*/data.pkl entries")
  with pytest.raises(SanaError, match="is a directory"):
    torch_files.load(tmp_path)
  with pytest.raises(SanaError, match="does not exist"):
    torch_files.load(tmp_path / "missing.pth")


class Storage:
  pass


class Tensor:
  """Pickles as torch pickles a tensor, with any size, stride and offset."""

  def __init__(self, offset, size, stride, storage=None):
    self.args = (storage or Storage(), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


def crafted(path, obj, numel=4, data=bytes(16), pid=None, byteorder="little"):
  """A zip checkpoint written by hand: data.pkl pickles `obj`, whose Storage is ('storage', Float, '0', .., numel)."""
  class Pickler(pickle.Pickler):
    def persistent_id(self, value):
      if isinstance(value, Storage):
        return pid or ("storage", torch.FloatStorage, "0", "cpu", numel)
      return None

  with zipfile.ZipFile(path, "w") as z:
    with z.open("archive/data.pkl", "w") as f:
      Pickler(f, protocol=2).dump(obj)
    z.writestr("archive/byteorder", byteorder)
    z.writestr("archive/data/0", data)
  return path


def test_crafted_tensors(tmp_path):
  values = np.arange(4, dtype=np.float32)
  out = torch_files.load(crafted(tmp_path / "ok.pth", {"t": Tensor(0, (2, 2), (1, 2)), "s": Tensor(3, (), ()),
                                                        "z": Tensor(0, (0, 5), (5, 1))}, data=values.tobytes()))
  np.testing.assert_array_equal(out["t"], values.reshape(2, 2).T)
  assert out["s"] == 3 and out["s"].shape == () and out["z"].shape == (0, 5)
  for name, tensor in {"offset": Tensor(3, (2,), (1,)), "stride": Tensor(0, (2, 2), (3, 1)),
                       "negative": Tensor(0, (2,), (-1,)), "offset_type": Tensor(-1, (1,), (1,)),
                       "mismatch": Tensor(0, (2, 2), (1,)), "not_int": Tensor(0, (2.0,), (1,))}.items():
    one_line_error(crafted(tmp_path / f"{name}.pth", {"t": tensor}), "runs past its storage|bad size|bad storage")
  one_line_error(crafted(tmp_path / "short.pth", {"t": Tensor(0, (8,), (1,))}, numel=8), "fewer than 8")
  one_line_error(crafted(tmp_path / "missing.pth", {"t": Tensor(0, (1,), (1,))},
                         pid=("storage", torch.FloatStorage, "9", "cpu", 1)), "names storage '9'")
  one_line_error(crafted(tmp_path / "pid.pth", {"t": Tensor(0, (1,), (1,))},
                         pid=("storage", collections.Counter, "0", "cpu", 1)),
                 "refuses to load: the pickle calls collections.Counter")
  one_line_error(crafted(tmp_path / "pid2.pth", {"t": Tensor(0, (1,), (1,))}, pid=("other", "0")),
                 "unexpected persistent id")
  one_line_error(crafted(tmp_path / "fake.pth", {"t": Tensor(0, (1,), (1,), storage=[1.0])}), "bad storage")
  one_line_error(crafted(tmp_path / "big.pth", {}, byteorder="big"), "big-endian")


def test_caps_and_old_formats(tmp_path, monkeypatch):
  path = save({"w": torch.ones(2)}, tmp_path / "w.pth")
  monkeypatch.setattr(torch_files, "MAX_PICKLE_BYTES", 16)
  one_line_error(path, "data.pkl is .* bytes, over the")
  with tarfile.open(tmp_path / "old.pth", "w") as tar:
    tar.add(save({"w": torch.ones(2)}, tmp_path / "l.pth", "legacy"), "sys_info")
  one_line_error(tmp_path / "old.pth", "old tar-format")


def test_crafted_pickles(tmp_path):
  def write(name, pkl):
    with zipfile.ZipFile(tmp_path / name, "w") as z:
      z.writestr("a/data.pkl", pkl)
    return tmp_path / name

  # BUILD on an allowed global would set attributes of this module's own objects
  one_line_error(write("build.pth", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}b."), "set the state")
  one_line_error(write("call.pth", b"\x80\x02ctorch\nFloatStorage\n)R."), "calls the storage type")
  one_line_error(write("garbage.pth", b"\x80\x02]q\x00(K\x01"), "damaged checkpoint")
  one_line_error(write("eval.pth", b"cbuiltins\neval\n(S'1'\ntR."), "calls builtins.eval")
  path = write("crc.pth", pickle.dumps({"a": 1}, protocol=2))
  data = bytearray(path.read_bytes())
  data[data.index(b"\x80\x02") + 3] ^= 1
  path.write_bytes(bytes(data))
  one_line_error(path, "Bad CRC")
