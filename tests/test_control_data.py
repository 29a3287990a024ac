"""ControlNet training data: control latents in records, precompute's --control edge / --control-images,
the iterator's data.control and synthetic control."""
import os

import numpy as np
import pytest
from PIL import Image
from test_data import SMALL, fake_encoders, png, write_latent_dataset
from test_dreambooth_data import write_images

from sana_jax import data
from sana_jax.controls import edge_map
from sana_jax.data import images, precompute, records, reencode
from sana_jax.errors import SanaError

DECODE = dict(latent_shape=(2, 3, 4), caption_length=5, caption_channels=2, tau=0.1, seed=0, epoch=0, index=0)
LATENTS = dict(latent_channels=4, caption_length=8, caption_channels=5)  # fake_encoders' shapes


def stored(out):
  """{key: record} of a precompute output."""
  reader = records.LatentRecordSource(str(out), seed=0, tau=0.1, **LATENTS)._reader
  return {r["key"]: r for r in map(records.unpack, reader)}


def test_record_round_trip_with_control():
  lat, control = np.random.default_rng(0).standard_normal((2, 2, 3, 4), np.float32)
  y, mask = np.ones((5, 2), np.float32), np.array([1, 1, 0, 0, 0])
  record = lambda **kw: records.make_record(lat, y, mask, captions=["c"], scores=[1.0], key="k", size=(64, 96), **kw)
  raw = record(control=control)
  ex = records.decode_example(raw, control=True, **DECODE)
  assert ex["control"].dtype == np.float16 and np.array_equal(ex["control"], control.astype(np.float16))
  assert "control" not in records.decode_example(raw, **DECODE)  # only when asked for
  with pytest.raises(ValueError, match="control latents of shape"):
    records.decode_example(records.pack({**records.unpack(raw), "control": control[:, :2]}), control=True, **DECODE)
  with pytest.raises(ValueError, match="without control latents"):
    records.decode_example(record(), control=True, **DECODE)
  with pytest.raises(ValueError, match="control latents of shape"):
    record(control=control[:, :2])


def shapes(root):
  """Images with a few clear edges: a bright square, and (taller than the bucket) a bright stripe."""
  root.mkdir()
  square, stripe = np.full((32, 32, 3), 20, np.uint8), np.full((48, 32, 3), 30, np.uint8)
  square[8:20, 10:24], stripe[:, 12:18] = 230, 200
  for name, pixels in (("square.png", square), ("stripe.png", stripe)):
    (root / name).write_bytes(png(pixels))
  return str(root)


def test_precompute_edge_control_and_the_iterator_reads_it(tmp_path):
  photos = shapes(tmp_path / "photos")
  encode_images, encode_captions = fake_encoders()
  out = tmp_path / "latents"
  meta = precompute.precompute(photos, str(out), encode_images=encode_images, encode_captions=encode_captions,
                               scaling_factor=0.5, buckets=[(32, 32)], spatial_compression=2, batch_size=2,
                               control="edge")
  assert meta["control"] == "edge" and meta["count"] == 2
  got = stored(out)
  for key in ("square.png", "stripe.png"):
    pixels = images.resize_cover_crop(Image.open(os.path.join(photos, key)).convert("RGB"), 32, 32)
    edges = edge_map((images.to_unit_range(pixels) + 1) / 2) * 2 - 1
    assert 0 < (edges > 0).mean() < 1  # a real edge map: neither empty nor full
    np.testing.assert_allclose(got[key]["control"], encode_images(edges[None])[0] * 0.5, atol=2e-3)
    assert got[key]["control"].shape == got[key]["latents"].shape and got[key]["control"].dtype == np.float16
  cfg = dict(source=f"array_record:{out}", shuffle=False, with_index=True, control=True, **LATENTS)
  batch = next(data.make_train_iterator(cfg, global_batch=2, seed=0))
  assert batch["control"].shape == batch["latents"].shape == (2, 16, 16, 4) and batch["control"].dtype == np.float32
  in_order = list(got.values())  # the records in file order: by record index
  for row, index in enumerate(batch["index"]):
    np.testing.assert_array_equal(batch["control"][row], in_order[index]["control"].astype(np.float32))
  assert "control" not in next(data.make_train_iterator({**cfg, "control": False}, global_batch=2))
  kept = tmp_path / "reencoded"  # new captions keep the control latents
  assert reencode.reencode(str(out), str(kept), encode_captions)["control"] == "edge"
  assert all(np.array_equal(r["control"], got[k]["control"]) for k, r in stored(kept).items())


def test_precompute_cli_control_images_by_file_name(tmp_path, monkeypatch, capsys):
  encode_images, encode_captions = fake_encoders()
  monkeypatch.setattr(precompute, "load_encoders", lambda model, **kw: (encode_images, encode_captions, None, 0.5, 2))
  photos = write_images(tmp_path / "photos", (10, 40, 70))  # 0.png, 1.png, 2.png
  conditions = tmp_path / "conditions"
  conditions.mkdir()
  (conditions / "0.png").write_bytes(png(np.full((16, 8, 3), 200, np.uint8)))  # another shape: cover-cropped
  (conditions / "1.png").write_bytes(png(np.full((8, 8, 3), 100, np.uint8)))  # 2.png has none: skipped
  out = tmp_path / "out"
  assert precompute.main(["--images", photos, "--model", "M", "--out", str(out), "--square", "--resolution", "32",
                          "--batch-size", "2", "--control-images", str(conditions)]) == 0
  capsys.readouterr()
  meta = records.read_metadata(str(out))
  assert meta["control"] == f"images:{conditions}" and meta["count"] == 2 and meta["skipped_examples"] == ["2.png"]
  got = stored(out)
  for key, value in (("0.png", 200), ("1.png", 100)):
    assert got[key]["control"].shape == (16, 16, 4)  # 32 px bucket
    np.testing.assert_allclose(got[key]["control"], (value / 127.5 - 1) * 0.5, atol=2e-3)


def test_iterator_needs_control_latents(tmp_path):
  rng = np.random.default_rng(0)
  write_latent_dataset(tmp_path, [(rng.standard_normal((2, 2, 3), np.float32), np.ones((1, 5, 4), np.float32),
                                   np.ones((1, 5), np.int32), [1.0])] * 2)
  cfg = dict(source=f"array_record:{tmp_path}", latent_channels=3, caption_length=5, caption_channels=4, control=True)
  with pytest.raises(SanaError, match="the records have no control latents .precompute with --control edge") as e:
    data.make_train_iterator(cfg, global_batch=2)
  assert "\n" not in str(e.value)
  os.remove(tmp_path / records.METADATA)  # without metadata: found in the scan
  with pytest.raises(SanaError, match="the records have no control latents"):
    data.make_train_iterator(cfg, global_batch=2)


@pytest.mark.parametrize("kw, match", [
    (dict(source="folder:photos"), "data.control needs precomputed latents"),
    (dict(source="tfds:photos"), "data.control needs precomputed latents"),
    (dict(control="edge"), "data.control must be True or False"),
])
def test_bad_control_configs_are_one_line_errors(kw, match):
  with pytest.raises(SanaError, match=match) as e:
    data.resolve({"control": True, **kw})
  assert "\n" not in str(e.value)


def test_synthetic_control():
  batch = next(data.make_train_iterator({**SMALL, "control": True}, global_batch=4, seed=0))
  assert batch["control"].shape == batch["latents"].shape
  np.testing.assert_array_equal(batch["control"], np.sign(batch["latents"]))
  assert "control" not in next(data.make_train_iterator(SMALL, global_batch=4, seed=0))


@pytest.mark.parametrize("flags, match", [
    (["--control", "edge", "--control-images", "{dir}"], "not allowed with argument"),
    (["--control", "canny"], "invalid choice"),
    (["--images", "tfds:x", "--control-images", "{dir}"], "--control-images needs an image folder"),
    (["--control-images", "{dir}/missing"], "is not a directory"),
    (["--control-images", "{dir}", "--class-images", "{dir}", "--class-prompt", "dog"], "does not go with"),
])
def test_precompute_control_flag_errors_are_one_line(tmp_path, capsys, flags, match):
  flags = [f.replace("{dir}", str(tmp_path)) for f in flags]
  images_flag = [] if "--images" in flags else ["--images", str(tmp_path)]
  assert precompute.main(images_flag + flags + ["--model", "M", "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and err.count("\n") == 1
