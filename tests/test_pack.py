"""Packed image records: `python -m sana_jax.data.pack` and the `packed:DIR` source, against `folder:DIR`."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_data import fake_encoders, make_folder, png, take

from sana_jax import data
from sana_jax.data import pack, precompute, records
from sana_jax.errors import SanaError

BUCKETS = [(32, 32), (32, 64), (64, 32)]


def clean_folder(root):
  """Nine readable images of three shapes: txt captions, JSON captions with clip scores, none; one rotated
  by its EXIF orientation (its displayed size is tall), one grey, one in a sub-folder."""
  root.mkdir()
  rng = np.random.default_rng(1)
  shapes = [(40, 40), (30, 60), (64, 32), (36, 36), (50, 100), (80, 40), (33, 33)]
  for j, (h, w) in enumerate(shapes):
    (root / f"{j}.png").write_bytes(png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    if j % 3 == 0:
      (root / f"{j}.json").write_text(json.dumps({"captions": [f"long {j}", f"short {j}", f"odd {j}"],
                                                  "clip_scores": [0.31, 0.29, 0.3]}))
    elif j % 3 == 1:
      (root / f"{j}.txt").write_text(f"caption {j}")
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90: stored wide, displayed tall
  Image.fromarray(rng.integers(0, 255, (20, 60, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
  (root / "sub").mkdir()
  Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "sub" / "grey.jpg")
  return str(root)


def test_packed_batches_equal_folder_batches(tmp_path):
  folder = clean_folder(tmp_path / "photos")
  meta = pack.pack(folder, str(tmp_path / "packed"), shard_size=4, threads=3)
  assert (meta["count"], meta["skipped"], [f["count"] for f in meta["files"]]) == (9, 0, [4, 4, 1])
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary directory left
  cfg = dict(buckets=BUCKETS, with_index=True, read_threads=2)
  by_folder = data.make_train_iterator({**cfg, "source": f"folder:{folder}"}, global_batch=2, seed=3)
  by_pack = data.make_train_iterator({**cfg, "source": f"packed:{tmp_path / 'packed'}"}, global_batch=2, seed=3)
  want, got = take(by_folder, 12), take(by_pack, 12)  # several epochs: the 3 captions are drawn apart
  for a, b in zip(want, got):
    assert list(a["captions"]) == list(b["captions"]) and a["index"].tolist() == b["index"].tolist()
    np.testing.assert_array_equal(a["images"], b["images"])
  assert len({c.split()[0] for b in got for c in b["captions"] if c.startswith(("long", "short", "odd"))}) > 1
  assert {b["images"].shape[1:3] for b in got} == {(32, 32), (32, 64), (64, 32)}  # rotated.jpg is tall
  assert data.skipped_count(by_pack) == 0 and by_pack.scan_skipped == 0
  state = by_pack.get_state()
  assert state["plan"] == by_folder.get_state()["plan"]  # the same plan: a folder run resumes from packed records


def test_precompute_from_packed_equals_precompute_from_folder(tmp_path):
  folder = clean_folder(tmp_path / "photos")
  pack.pack(folder, str(tmp_path / "packed"))
  encode_images, encode_captions = fake_encoders()
  kw = dict(encode_images=encode_images, encode_captions=encode_captions, scaling_factor=0.5, buckets=BUCKETS,
            spatial_compression=2, batch_size=3)
  a = precompute.precompute(folder, str(tmp_path / "a"), **kw)
  b = precompute.precompute(f"packed:{tmp_path / 'packed'}", str(tmp_path / "b"), **kw)
  assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
  read = lambda d: [records.unpack(r) for r in records.LatentRecordSource(
      str(d), seed=0, tau=0.1, caption_length=6, caption_channels=5, latent_channels=4)._reader]
  for x, y in zip(read(tmp_path / "a"), read(tmp_path / "b"), strict=True):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x if k not in ("captions", "key", "size"))
    assert (x["captions"], x["key"], x["size"]) == (y["captions"], y["key"], y["size"])
  with pytest.raises(SanaError, match="packed:DIR"):
    precompute.precompute(f"packed:{tmp_path / 'packed'}", str(tmp_path / "c"), instance_prompt="dog", **kw)


def test_bad_images_are_skipped_and_counted_when_packing(tmp_path):
  make_folder(tmp_path / "photos")  # broken.png (no header) and cut.jpg (truncated pixels) among them
  (tmp_path / "photos" / "e.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
  (tmp_path / "photos" / "e.json").write_text("{not json")  # a bad sidecar: skipped as folder:DIR skips it
  meta = pack.pack(str(tmp_path / "photos"), str(tmp_path / "packed"))
  assert meta["count"] == 5 and meta["skipped"] == 3
  assert sorted(meta["skipped_examples"]) == ["broken.png", "cut.jpg", "e.png"]
  _, sizes, paths = pack.read(str(tmp_path / "packed"))
  import grain
  reader = grain.sources.ArrayRecordDataSource(paths)
  stored = [records.unpack(reader[i]) for i in range(len(reader))]
  assert [r["key"] for r in stored] == ["a.png", "b.png", "c.png", "d.png", os.path.join("sub", "gray.jpg")]
  assert sizes.tolist() == [r["size"] for r in stored] == [[40, 40], [30, 60], [64, 32], [36, 36], [48, 48]]
  d = stored[3]
  assert d["captions"] == ["long d", "short d"] and d["scores"] == [0.4, 0.2]  # several captions, with their scores
  assert d["image"] == (tmp_path / "photos" / "d.png").read_bytes()  # the file's own bytes
  it = data.make_train_iterator(dict(source=f"packed:{tmp_path / 'packed'}", buckets=[(32, 32)], caption_tau=0.0),
                                global_batch=5, seed=0)
  captions = sorted(next(it)["captions"].tolist())
  assert captions == ["", "caption a", "caption b", "caption c", "long d"] and data.skipped_count(it) == 0


def cli(args, capsys):
  code = pack.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def test_cli(tmp_path, capsys):
  folder = clean_folder(tmp_path / "photos")
  code, out, _ = cli(["--images", folder, "--out", tmp_path / "packed", "--shard-size", "5"], capsys)
  assert code == 0 and json.loads(out) == {"count": 9, "skipped": 0, "files": 2}
  code, _, err = cli(["--images", folder, "--out", tmp_path / "packed"], capsys)
  assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
  code, out, _ = cli(["--images", folder, "--out", tmp_path / "packed", "--overwrite"], capsys)
  assert code == 0 and json.loads(out)["files"] == 1
  code, _, err = cli(["--images", folder, "--out", tmp_path / "photos", "--overwrite"], capsys)
  assert code == 2 and err.count("\n") == 1
  code, _, err = cli(["--images", tmp_path / "photos", "--out", folder + "x", "--overwrite"], capsys)
  assert code == 0  # a new directory: --overwrite has nothing to replace


@pytest.mark.parametrize("args, match", [
    ([], "required"),
    (["--images", "{tmp}/missing", "--out", "{tmp}/out"], "does not exist"),
    (["--images", "{tmp}/photos", "--out", "{tmp}/full"], "exists and is not empty"),
    (["--images", "{tmp}/photos", "--out", "{tmp}/full", "--overwrite"], "not a pack output"),
    (["--images", "{tmp}/photos", "--out", "{tmp}/out", "--shard-size", "0"], "must be positive"),
    (["--images", "{tmp}/empty", "--out", "{tmp}/out"], "holds no images"),
    (["--images", "{tmp}/bad", "--out", "{tmp}/out"], "no readable image"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, match):
  clean_folder(tmp_path / "photos")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("not ours")
  (tmp_path / "empty").mkdir()
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
  code, _, err = cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
  assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "out") and (tmp_path / "full" / "keep.txt").exists()


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / pack.METADATA).write_text('{"format": "sana-images", "vers'), "not valid JSON"),
    (lambda d: (d / pack.METADATA).write_text('{"format": "sana-latents", "version": 1}'), "not a sana-images"),
    (lambda d: (d / pack.METADATA).write_text(json.dumps({**json.loads((d / pack.METADATA).read_text()),
                                                          "count": 99})), "damaged"),
    (lambda d: (d / pack.METADATA).write_text(json.dumps({**json.loads((d / pack.METADATA).read_text()),
                                                          "files": [{"path": "../x", "count": 9}]})), "outside"),
    (lambda d: (d / pack.SIZES).write_bytes((d / pack.SIZES).read_bytes()[:-8]), "image_sizes.npy"),
    (lambda d: os.remove(d / pack.METADATA), "does not exist"),
])
def test_damaged_pack_is_a_one_line_error(tmp_path, damage, match):
  pack.pack(clean_folder(tmp_path / "photos"), str(tmp_path / "packed"))
  damage(tmp_path / "packed")
  with pytest.raises(SanaError, match=match) as e:
    data.make_train_iterator(dict(source=f"packed:{tmp_path / 'packed'}", buckets=BUCKETS), global_batch=2)
  assert "\n" not in str(e.value)


def test_packed_is_an_image_source_in_the_config(tmp_path):
  with pytest.raises(SanaError, match="needs precomputed latents"):
    data.resolve(dict(source="packed:/x", control=True))
  with pytest.raises(SanaError, match="holds images"):
    data.null_text(dict(source="packed:/x"))
  with pytest.raises(SanaError, match="instance_prompt needs a folder"):
    data.resolve(dict(source="packed:/x", instance_prompt="dog"))
