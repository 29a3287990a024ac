"""precompute on several processes sharing --out: two processes on this machine read back as one process's run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_data import fake_encoders, make_folder, png
from test_dreambooth_data import CLASS, CLASS_VALUES, DOG, INSTANCE_VALUES, write_images

from sana_jax.data import precompute, records
from sana_jax.errors import SanaError

TESTS = os.path.dirname(os.path.abspath(__file__))
NULL = (np.full((6, 5), 0.25, np.float32), np.eye(1, 6, dtype=np.int32)[0])
PROCESS = """
import json, sys
sys.path[:0] = {path!r}
import numpy as np
from test_data import fake_encoders
from sana_jax.data import precompute
kw = json.loads({kw!r})
encode_images, encode_captions = fake_encoders()
null = (np.full((6, 5), 0.25, np.float32), np.eye(1, 6, dtype=np.int32)[0])
precompute.precompute(encode_images=encode_images, encode_captions=encode_captions, null_text=null, **kw)
"""


def folder_case(tmp_path):
  make_folder(tmp_path / "photos")  # broken.png and cut.jpg: skipped, and counted once
  for j in range(5):
    (tmp_path / "photos" / f"w{j}.png").write_bytes(png(np.full((16, 32, 3), 20 * j, np.uint8)))
  return dict(images=str(tmp_path / "photos"), all_captions=True, buckets=[[32, 32], [32, 64]])


def dreambooth_case(tmp_path):
  dog, dogs = write_images(tmp_path / "dog", INSTANCE_VALUES), write_images(tmp_path / "dogs", CLASS_VALUES)
  for folder in (tmp_path / "dog", tmp_path / "dogs"):
    (folder / "wide.png").write_bytes(png(np.full((8, 16, 3), 250, np.uint8)))
  return dict(images=dog, buckets=[[8, 8], [8, 16]], instance_prompt=DOG, class_images=dogs, class_prompt=CLASS)


def stored(out):
  source = records.LatentRecordSource(str(out), seed=0, tau=0.1, caption_length=6, caption_channels=5,
                                      latent_channels=4)
  return [records.unpack(source._reader[i]) for i in range(len(source))]


@pytest.mark.parametrize("case", [folder_case, dreambooth_case])
def test_two_processes_write_what_one_writes(tmp_path, case):
  kw = dict(case(tmp_path), scaling_factor=0.5, spatial_compression=2, batch_size=2, shard_size=2)
  encode_images, encode_captions = fake_encoders()
  one = precompute.precompute(out=str(tmp_path / "one"), encode_images=encode_images, encode_captions=encode_captions,
                              null_text=NULL, **kw)
  out = str(tmp_path / "two")
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS.format(path=[os.path.dirname(TESTS), TESTS], kw=json.dumps(
      {**kw, "out": out, "process_index": i, "process_count": 2, "wait_timeout": 120}))], stderr=subprocess.PIPE,
      text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in (1, 0)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  assert not os.path.exists(out + ".partial") and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  two = records.read_metadata(out)
  files = [f["path"] for b in two["buckets"] for f in b["files"]]
  assert sorted(os.listdir(out)) == sorted(files + [records.METADATA, records.NULL_TEXT])
  assert any("-p00001-" in f for f in files) and any("-p00000-" in f for f in files)
  strip = lambda meta: {**meta, "buckets": [{k: v for k, v in b.items() if k != "files"} for b in meta["buckets"]]}
  assert strip(two) == strip(one)
  a, b = stored(tmp_path / "one"), stored(out)
  assert len(a) == len(b) == one["count"]
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    assert (x["captions"], x["key"], x["size"]) == (y["captions"], y["key"], y["size"])
    for k in ("latents", "y", "mask", "scores"):
      np.testing.assert_array_equal(x[k], y[k])
  with open(os.path.join(out, records.NULL_TEXT), "rb") as f, open(tmp_path / "one" / records.NULL_TEXT, "rb") as g:
    assert f.read() == g.read()


def test_a_missing_process_leaves_no_output(tmp_path):
  encode_images, encode_captions = fake_encoders()
  kw = dict(encode_images=encode_images, encode_captions=encode_captions, scaling_factor=0.5, spatial_compression=2,
            process_count=2, wait_timeout=0.3, **folder_case(tmp_path))
  out = str(tmp_path / "out")
  with pytest.raises(SanaError, match=r"process\(es\) \[1\] of 2 did not finish within 0.3 s") as e:
    precompute.precompute(out=out, process_index=0, **kw)
  assert "\n" not in str(e.value) and not os.path.exists(out) and not os.path.exists(out + ".partial")
  with pytest.raises(SanaError, match="process 0 did not start") as e:
    precompute.precompute(out=out, process_index=1, **kw)
  assert "\n" not in str(e.value) and not os.path.exists(out)


@pytest.mark.parametrize("flags, match", [
    (["--process-index", "2", "--process-count", "2"], "must be an integer in [0, --process-count 2)"),
    (["--process-index", "0"], "go together"),
])
def test_process_flag_errors_are_one_line(tmp_path, capsys, flags, match):
  args = ["--images", str(tmp_path), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
  assert precompute.main(args + flags) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and err.count("\n") == 1
