"""The input pipeline: plans, sources, resume, record and TFDS formats, preprocessing, precompute."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sana_jax import data
from sana_jax.data import hashing, images, loader, precompute, records, reencode
from sana_jax.data.plan import Plans
from sana_jax.errors import SanaError

SMALL = dict(synthetic_size=300, buckets=[(64, 64), (64, 128), (128, 64)], latent_size=2, latent_channels=4,
             caption_length=8, caption_channels=6, with_index=True)


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def test_hash_scalar_and_array_agree():
  keys = np.array([0, 1, 7, 2**40, -3])
  assert [hashing.hash64(5, 2, k) for k in keys] == hashing.hash64_array(5, 2, keys).tolist()


def test_synthetic_is_deterministic_and_seeded():
  a, b, c = (data.make_train_iterator(SMALL, global_batch=8, seed=s) for s in (0, 0, 1))
  ba, bb, bc = take(a, 4), take(b, 4), take(c, 4)
  assert all(same(x, y) for x, y in zip(ba, bb))
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(ba, bc))
  x = ba[0]
  assert x["latents"].dtype == np.float32 and x["y"].dtype == np.float32 and x["mask"].dtype == np.int32
  assert x["y"].shape == (8, 8, 6) and x["mask"].shape == (8, 8) and x["latents"].shape[-1] == 4
  assert (x["mask"][:, 0] == 1).all() and (x["y"][x["mask"] == 0] == 0).all()  # padded rows are zero
  y, mask = data.null_text(SMALL)
  assert y.shape == (8, 6) and not y.any() and mask.tolist() == [1] + [0] * 7


def test_global_batch_independent_of_process_count():
  one = data.make_train_iterator(SMALL, global_batch=8, seed=4, process_count=1)
  two = [data.make_train_iterator(SMALL, global_batch=8, seed=4, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(5):
    whole, parts = next(one), [next(it) for it in two]
    assert parts[0]["latents"].shape[0] == 4
    assert same(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
  with pytest.raises(SanaError, match="does not split"):
    data.make_train_iterator(SMALL, global_batch=8, process_count=3)


def test_one_bucket_per_batch_and_epochs():
  cfg = {**SMALL, "synthetic_size": 100}
  source = data.make_source(data.resolve(cfg), seed=2, split="train", table=data.bucket_table(cfg["buckets"], 2, 32))
  plans = Plans(source.bucket_ids, 3, 8, 2)
  per_epoch = plans.batches_per_epoch
  assert per_epoch == sum(np.bincount(source.bucket_ids) // 8)
  it = data.make_train_iterator(cfg, global_batch=8, seed=2)
  epochs = [[next(it) for _ in range(per_epoch)] for _ in range(2)]
  for batches in epochs:
    seen = np.concatenate([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)  # no example twice in an epoch
    for b in batches:
      bucket = source.bucket_ids[b["index"]]
      assert (bucket == bucket[0]).all()
      assert b["latents"].shape[1:3] == source.buckets[bucket[0]][:2]
  first, second = (np.concatenate([b["index"] for b in e]) for e in epochs)
  assert not np.array_equal(first, second)  # reshuffled per epoch


@pytest.mark.parametrize("steps", [3, 13])  # mid-epoch, and across the epoch boundary (12 per epoch)
def test_resume_gives_identical_next_batches(steps):
  cfg = {**SMALL, "synthetic_size": 100}
  it = data.make_train_iterator(cfg, global_batch=8, seed=5)
  take(it, steps)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as grain's orbax handler writes it
  want = take(it, 4)
  resumed = data.make_train_iterator(cfg, global_batch=8, seed=5)
  resumed.set_state(state)
  assert all(same(x, y) for x, y in zip(want, take(resumed, 4)))
  other = data.make_train_iterator(cfg, global_batch=8, seed=6)
  with pytest.raises(SanaError, match="another data pipeline"):
    other.set_state(state)


def test_orbax_checkpoint_of_iterator_state(tmp_path):
  import grain
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  it = data.make_train_iterator(SMALL, global_batch=4, seed=3)
  take(it, 5)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)}),
                                       data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = take(it, 3)
  resumed = data.make_train_iterator(SMALL, global_batch=4, seed=3)
  mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": jnp.zeros(3)}),
                                          data=grain.checkpoint.CheckpointRestore(resumed)))
  assert all(same(x, y) for x, y in zip(want, take(resumed, 3)))
  mngr.close()


class Flaky:
  """A source wrapper whose listed examples fail to load."""

  def __init__(self, source, bad):
    self.source, self.bad = source, set(bad)
    self.kind, self.bucket_ids, self.buckets = source.kind, source.bucket_ids, source.buckets

  def load(self, index, epoch):
    if index in self.bad:
      raise ValueError("corrupt")
    return self.source.load(index, epoch)

  def describe(self, index):
    return str(index)


def test_bad_examples_are_refilled_and_counted():
  c = data.resolve(SMALL)
  source = data.make_source(c, seed=0, split="train", table=data.bucket_table(c.buckets, 2, 32))
  plans = Plans(source.bucket_ids, 3, 8, 0)
  bad = plans.batch(0).rows[[1, 6]].tolist()
  flaky = Flaky(source, bad)

  def run(p, n):
    ds = loader.GlobalBatches(flaky, plans, process_index=p, process_count=n, collate=data.collate_latents,
                                caption_length=8, with_index=True)
    return loader.iterate(ds, read_threads=1, prefetch=1)
  it = run(0, 1)
  batch = next(it)
  assert batch["latents"].shape[0] == 8 and not set(bad) & set(batch["index"].tolist())
  assert data.skipped_count(it) == 2
  assert (source.bucket_ids[batch["index"]] == source.bucket_ids[batch["index"][0]]).all()
  halves = [next(run(p, 2)) for p in (0, 1)]
  assert np.array_equal(np.concatenate([h["index"] for h in halves]), batch["index"])
  state = it.get_state()
  resumed = run(0, 1)
  resumed.set_state(state)
  assert data.skipped_count(resumed) == 2


def test_resize_cover_crop_shapes_and_pixels():
  x = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))  # value = column
  out = images.resize_cover_crop(Image.fromarray(x), 64, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # scale 0.64 covers 64 rows; the 64 columns come from source columns 50..150 around the centre
  assert abs(int(out[32, 0, 0]) - 51) <= 1 and abs(int(out[32, 63, 0]) - 148) <= 1
  assert np.abs(np.diff(out[:, 20, 0].astype(int))).max() == 0  # columns stay constant down the rows
  tall = images.resize_cover_crop(Image.fromarray(np.zeros((300, 50, 3), np.uint8)), 96, 32)
  assert tall.shape == (96, 32, 3)
  f = images.to_unit_range(np.array([0, 255], np.uint8))
  assert f.tolist() == [-1.0, 1.0]


def test_caption_choice_weights():
  scores = [0.3, 0.35, 0.2]
  assert {images.choose_caption(scores, 0.0, 0, 0, i) for i in range(50)} == {1}
  assert {images.choose_caption(scores, 1e-4, 0, 0, i) for i in range(50)} == {1}
  assert images.choose_caption(["x"], 0.1, 0, 0, 0) == 0 and images.choose_caption([0, 0], 0.1, 0, 0, 1) in (0, 1)
  n = 4000
  picks = np.bincount([images.choose_caption([0.5, 0.25], 1.0, 7, 0, i) for i in range(n)], minlength=2) / n
  assert abs(picks[0] - 2 / 3) < 0.03  # weights score^(1/tau) = 2:1 at tau = 1
  picks = np.bincount([images.choose_caption([0.5, 0.25], 0.5, 7, 0, i) for i in range(n)], minlength=2) / n
  assert abs(picks[0] - 0.8) < 0.03    # 4:1 at tau = 0.5
  w = images.caption_weights([0.4, 0.2], 0.1)
  np.testing.assert_allclose(w, [1024 / 1025, 1 / 1025])
  a = [images.choose_caption([0.5, 0.5], 1.0, 1, e, 3) for e in range(40)]
  assert a == [images.choose_caption([0.5, 0.5], 1.0, 1, e, 3) for e in range(40)] and len(set(a)) == 2


def write_latent_dataset(directory, examples, *, bad_record_after=None):
  """examples: (latents, y [K, L, Dy], mask [K, L], scores); returns the records' order."""
  writer = records.ShardWriter(directory, shard_size=2)
  for i, (lat, y, mask, scores) in enumerate(examples):
    size = (lat.shape[0] * 32, lat.shape[1] * 32)
    writer.write(size, lat.shape, records.make_record(lat, y, mask, captions=["c"] * len(y), scores=scores,
                                                      key=f"k{i}", size=size))
    if bad_record_after == i:
      writer.write(size, lat.shape, b"not msgpack")
  buckets = writer.close()
  meta = dict(format=records.FORMAT, version=1, count=sum(b["count"] for b in buckets), skipped=0,
              latent_channels=3, caption_length=5, caption_channels=4, buckets=buckets)
  with open(os.path.join(directory, records.METADATA), "w") as f:
    json.dump(meta, f)


def test_array_record_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  examples = []
  for i in range(6):
    h, w = (2, 2) if i % 2 else (2, 3)
    mask = np.zeros((2, 5), np.int32)
    mask[0, :2 + i % 3], mask[1, :4] = 1, 1
    y = rng.standard_normal((2, 5, 4)).astype(np.float32) * mask[..., None]
    examples.append((rng.standard_normal((h, w, 3)).astype(np.float32), y, mask, [0.9, 0.1]))
  write_latent_dataset(tmp_path, examples, bad_record_after=2)
  cfg = dict(source=f"array_record:{tmp_path}", latent_channels=3, caption_length=7, caption_channels=4, shuffle=False,
             with_index=True, caption_tau=0.0)
  it = data.make_train_iterator(cfg, global_batch=2, seed=0)
  meta = records.read_metadata(tmp_path)
  assert [b["size"] for b in meta["buckets"]] == [[64, 64], [64, 96]]
  got = take(it, 3)
  # file order: bucket 64x64 holds examples 1, 3, 5; bucket 64x96 holds 0, 2, <bad>, 4
  by_index = {1: 0, 3: 1, 5: 2, 0: 3, 2: 4, 4: 6}
  for batch in got:
    for row, index in enumerate(batch["index"]):
      lat, y, mask, _ = examples[[k for k, v in by_index.items() if v == index][0]]
      np.testing.assert_allclose(batch["latents"][row], lat.astype(np.float16).astype(np.float32))
      np.testing.assert_allclose(batch["y"][row, :5], y[0].astype(np.float16).astype(np.float32))  # tau 0: caption 0
      assert batch["y"][row, 5:].sum() == 0 and batch["mask"][row].tolist() == mask[0].tolist() + [0, 0]
  assert data.skipped_count(it) == 1  # the corrupt record, refilled from its bucket
  with pytest.raises(SanaError, match="caption_channels"):
    data.make_train_iterator({**cfg, "caption_channels": 5}, global_batch=2)
  os.remove(tmp_path / records.METADATA)  # a bare glob: shapes are found by reading every record
  it = data.make_train_iterator({**cfg, "source": f"array_record:{tmp_path}/*.array_record"}, global_batch=3, seed=0)
  assert {next(it)["latents"].shape for _ in range(2)} == {(3, 2, 2, 3), (3, 2, 3, 3)}
  assert it.scan_skipped == 1


def make_folder(root):
  """Six images: square, wide, tall, one with JSON multi-captions, a corrupt one, a truncated one."""
  root.mkdir()
  rng = np.random.default_rng(0)
  for name, (h, w) in {"a": (40, 40), "b": (30, 60), "c": (64, 32), "d": (36, 36)}.items():
    (root / f"{name}.png").write_bytes(png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    (root / f"{name}.txt").write_text(f"caption {name}")
  (root / "d.json").write_text(json.dumps({"captions": ["long d", "short d"], "clip_scores": [0.4, 0.2]}))
  (root / "sub").mkdir()
  Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "sub" / "gray.jpg")  # no caption
  (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
  (root / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # the header reads, the pixels do not


def test_tfds_image_folder_builder(tmp_path):
  from sana_jax.data import tfds_image_folder
  make_folder(tmp_path / "photos")
  name = tfds_image_folder.build(str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"))
  assert name == "sana_image_folder/photos"
  info = tfds_image_folder.info(name, str(tmp_path / "tfds"))
  assert info["num_examples"]["train"] == 5 and info["skipped"] == 2
  assert sorted(info["skipped_examples"]) == ["broken.png", "cut.jpg"]
  import tensorflow_datasets as tfds
  ds = tfds.data_source(name, split="train", data_dir=str(tmp_path / "tfds"))
  ex = {str(e["key"], "utf-8"): e for e in (ds[i] for i in range(len(ds)))}
  assert [c.decode() for c in ex["d.png"]["captions"]] == ["long d", "short d"]
  np.testing.assert_allclose(ex["d.png"]["scores"], [0.4, 0.2])
  assert ex["b.png"]["image"].shape == (30, 60, 3) and (ex["b.png"]["height"], ex["b.png"]["width"]) == (30, 60)
  assert ex["sub/gray.jpg"]["image"].shape == (48, 48, 3)  # stored as RGB
  cfg = dict(source=f"tfds:{name}", data_dir=str(tmp_path / "tfds"), buckets=[(32, 32), (32, 64), (64, 32)],
             shuffle=False, with_index=True, caption_tau=0.0)
  it = data.make_train_iterator(cfg, global_batch=1, seed=0)
  assert it.kind == "images"
  batches = take(it, 5)
  shapes = {str(b["captions"][0]): b["images"].shape for b in batches}
  assert shapes["caption b"] == (1, 32, 64, 3) and shapes["caption c"] == (1, 64, 32, 3)
  assert shapes["long d"] == (1, 32, 32, 3)  # tau 0: the best-scored caption
  assert all(-1 <= b["images"].min() and b["images"].max() <= 1 for b in batches)


def test_folder_source_skips_corrupt_images(tmp_path):
  make_folder(tmp_path / "photos")
  cfg = dict(source=f"folder:{tmp_path / 'photos'}", buckets=[(32, 32)], with_index=True)
  it = data.make_train_iterator(cfg, global_batch=2, seed=0)
  assert it.scan_skipped == 1  # broken.png: no readable header
  for _ in range(4):
    assert next(it)["images"].shape == (2, 32, 32, 3)
  assert data.skipped_count(it) >= 1  # cut.jpg fails when decoded, and is refilled


def fake_encoders(channels=4, length=6, width=5):
  """Deterministic stand-ins for the DC-AE (2x2 mean pool, tiled channels) and the text encoder."""
  def encode_images(x):
    b, h, w, _ = x.shape
    pooled = x.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
    return np.concatenate([pooled, pooled[..., :1]], -1)[..., :channels]

  def encode_captions(texts):
    y = np.zeros((len(texts), length, width), np.float32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      n = min(len(t.split()) + 1, length)
      y[i, :n], mask[i, :n] = len(t), 1
    return y, mask
  return encode_images, encode_captions


def test_precompute_writes_records_the_iterator_reads(tmp_path):
  make_folder(tmp_path / "photos")
  encode_images, encode_captions = fake_encoders()
  out = tmp_path / "latents"
  null = (np.full((6, 5), 0.25, np.float32), np.eye(1, 6, dtype=np.int32)[0])
  meta = precompute.precompute(str(tmp_path / "photos"), str(out), encode_images=encode_images,
                               encode_captions=encode_captions, scaling_factor=0.5, buckets=[(32, 32), (32, 64)],
                               null_text=null, spatial_compression=2, batch_size=2, all_captions=True)
  assert meta["count"] == 5 and meta["skipped"] == 2 and sorted(meta["skipped_examples"]) == ["broken.png", "cut.jpg"]
  assert (meta["latent_channels"], meta["caption_length"], meta["caption_channels"]) == (4, 6, 5)
  assert not os.path.exists(str(out) + ".partial")
  cfg = dict(source=f"array_record:{out}", latent_channels=4, caption_length=8, caption_channels=5, buckets=None,
             shuffle=False, with_index=True)
  y, mask = data.null_text(cfg)
  assert y.shape == (8, 5) and (y[:6] == 0.25).all() and (y[6:] == 0).all() and mask.tolist() == [1] + [0] * 7
  it = data.make_train_iterator(cfg, global_batch=1, seed=0)
  shapes = sorted(next(it)["latents"].shape[1:] for _ in range(5))
  assert shapes == [(16, 16, 4)] * 4 + [(16, 32, 4)]  # b.png is wide; c.png (2:1 tall) is nearest 1:1
  reader = records.LatentRecordSource(str(out), seed=0, tau=0.1, caption_length=8, caption_channels=5,
                                      latent_channels=4)._reader
  stored = [records.unpack(reader[i]) for i in range(len(reader))]
  raw, d = stored[0], next(r for r in stored if r["key"] == "d.png")
  assert raw["key"] == "a.png" and raw["latents"].dtype == np.float16
  pixels = images.to_unit_range(images.resize_cover_crop(Image.open(tmp_path / "photos" / "a.png").convert("RGB"),
                                                         32, 32))
  np.testing.assert_allclose(raw["latents"], encode_images(pixels[None])[0] * 0.5, atol=2e-3)
  assert d["captions"] == ["long d", "short d"] and d["y"].shape == (2, 3, 5)
  np.testing.assert_allclose(d["scores"], [0.4, 0.2])
  with pytest.raises(SanaError, match="not empty"):
    precompute.precompute(str(tmp_path / "photos"), str(out), encode_images=encode_images,
                          encode_captions=encode_captions, scaling_factor=0.5, buckets=[(32, 32)],
                          spatial_compression=2)


def test_reencode_keeps_latents_and_replaces_text(tmp_path):
  make_folder(tmp_path / "photos")
  encode_images, encode_captions = fake_encoders()
  old, new = tmp_path / "latents", tmp_path / "reencoded"
  precompute.precompute(str(tmp_path / "photos"), str(old), encode_images=encode_images,
                        encode_captions=encode_captions, scaling_factor=0.5, buckets=[(32, 32), (32, 64)],
                        spatial_compression=2, batch_size=2, all_captions=True)

  def wider(texts):  # another "text encoder": width 7, value = number of words
    y, mask = np.zeros((len(texts), 4, 7), np.float32), np.zeros((len(texts), 4), np.int32)
    for i, t in enumerate(texts):
      y[i, :2], mask[i, :2] = len(t.split()), 1
    return y, mask
  null = (np.full((4, 7), -1.0, np.float32), np.eye(1, 4, dtype=np.int32)[0])
  meta = reencode.reencode(str(old), str(new), wider, null, batch_size=2, extra_metadata={"model": "other"})
  assert (meta["count"], meta["caption_length"], meta["caption_channels"], meta["model"]) == (5, 4, 7, "other")
  read = lambda d, width: {r["key"]: r for r in map(records.unpack, records.LatentRecordSource(
      str(d), seed=0, tau=0.1, caption_length=8, caption_channels=width, latent_channels=4)._reader)}
  before, after = read(old, 5), read(new, 7)
  assert sorted(after) == sorted(before) and not os.path.exists(str(new) + ".partial")
  for key, r in after.items():
    assert r["captions"] == before[key]["captions"] and np.array_equal(r["latents"], before[key]["latents"])
    assert r["y"].shape == (len(r["captions"]), 2, 7)
    assert [row[0, 0] for row in r["y"]] == [len(c.split()) for c in r["captions"]]
  y, mask = data.null_text(dict(source=f"array_record:{new}", caption_length=8, caption_channels=7))
  assert (y[:4] == -1).all() and mask.tolist() == [1] + [0] * 7
  with pytest.raises(SanaError, match="exists"):
    reencode.reencode(str(old), str(new), wider)
  assert reencode.main(["--data", str(tmp_path / "photos"), "--model", "M", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("args, match", [
    ([], "required"),
    (["--images", "IMG", "--model", "MODEL", "--out", "OUT", "--resolution", "300"], "no aspect-ratio table"),
    (["--images", "IMG", "--model", "{missing}", "--out", "OUT"], "does not exist"),
])
def test_precompute_cli_errors_are_one_line(tmp_path, capsys, args, match):
  args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
  assert precompute.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and err.count("\n") == 1


@pytest.mark.slow  # imports torch and diffusers (~10 s)
def test_precompute_cli_with_a_tiny_model(tmp_path, capsys):
  """End to end: a tiny random diffusers-format directory (DC-AE, Gemma-2, tokenizer) saved by the
  reference libraries, then the CLI, then the training iterator."""
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  from reference import byte_bpe_tokenizer

  from sana_jax.text import COMPLEX_HUMAN_INSTRUCTION
  model = tmp_path / "model"
  tok = byte_bpe_tokenizer(list(COMPLEX_HUMAN_INSTRUCTION) + ["caption a", "long d"], 400)
  tok.save_pretrained(model / "tokenizer")
  transformers.Gemma2Model(transformers.Gemma2Config(
      vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=64, max_position_embeddings=1024,
      pad_token_id=0, eos_token_id=1, bos_token_id=2)).save_pretrained(model / "text_encoder")
  diffusers.AutoencoderDC(
      in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
      decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
      encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
      decoder_qkv_multiscales=((), ()), downsample_block_type="conv", upsample_block_type="interpolate",
      scaling_factor=0.5).save_pretrained(model / "vae")
  make_folder(tmp_path / "photos")
  out = tmp_path / "out"
  assert precompute.main(["--images", str(tmp_path / "photos"), "--model", str(model), "--out", str(out),
                          "--square", "--batch-size", "4", "--max-sequence-length", "12"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary == {"count": 5, "skipped": 2, "latent_channels": 4, "caption_length": 12, "caption_channels": 16}
  cfg = dict(source=f"array_record:{out}", latent_channels=4, caption_length=12, caption_channels=16)
  batch = next(data.make_train_iterator(cfg, global_batch=4, seed=0))
  assert batch["latents"].shape == (4, 256, 256, 4) and batch["y"].shape == (4, 12, 16)
  assert np.isfinite(batch["latents"]).all() and (batch["mask"][:, 0] == 1).all()
  y, mask = data.null_text(cfg)  # the empty caption: BOS, then padding whose states are kept
  assert y.shape == (12, 16) and mask.tolist() == [1] + [0] * 11 and np.abs(y[1:]).sum() > 0


def test_splits(tmp_path):
  train = next(data.make_train_iterator(SMALL, global_batch=4, seed=0))
  val = next(data.make_train_iterator(SMALL, global_batch=4, seed=0, split="validation"))
  assert not np.array_equal(train["latents"][0].ravel()[:5], val["latents"][0].ravel()[:5])
  rng = np.random.default_rng(1)
  for split, n in (("train", 4), ("validation", 2)):
    os.makedirs(tmp_path / split)
    write_latent_dataset(tmp_path / split, [(rng.standard_normal((2, 2, 3)), np.ones((1, 5, 4)), np.ones((1, 5)), [1])
                                            for _ in range(n)])
  cfg = dict(source=f"array_record:{tmp_path}", latent_channels=3, caption_length=5, caption_channels=4)
  assert data.make_train_iterator(cfg, global_batch=4).get_state()["plan"] != \
      data.make_train_iterator(cfg, global_batch=2, split="validation").get_state()["plan"]
  with pytest.raises(SanaError, match="no global batch of 4"):
    data.make_train_iterator(cfg, global_batch=4, split="validation")


@pytest.mark.slow  # starts a grain worker process (~5 s)
def test_state_carries_over_to_other_process_and_worker_counts():
  it = data.make_train_iterator(SMALL, global_batch=8, seed=9)
  take(it, 3)
  state = it.get_state()
  want = take(it, 2)
  halves = [data.make_train_iterator(SMALL, global_batch=8, seed=9, process_index=p, process_count=2) for p in (0, 1)]
  for h in halves:
    h.set_state(state)
  got = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(take(halves[0], 2), take(halves[1], 2))]
  assert all(same(x, y) for x, y in zip(want, got))
  workers = data.make_train_iterator({**SMALL, "num_workers": 1}, global_batch=8, seed=9)
  workers.set_state(state)
  try:
    assert all(same(x, y) for x, y in zip(want, take(workers, 2)))
    assert workers.get_state()["step"] == 5
  finally:
    workers.close()
