"""DreamBooth data: instance prompt, repeats, prior-preservation class images, through the folder source
and through precompute's records."""
import collections
import json

import numpy as np
import pytest
from test_data import fake_encoders, png, same, take

from sana_jax import data
from sana_jax.data import precompute, records
from sana_jax.errors import SanaError

DOG, CLASS = "a photo of sks dog", "a photo of a dog, any dog"  # different lengths: fake_encoders' y = len(text)
INSTANCE_VALUES, CLASS_VALUES = (10, 40, 70), (130, 160, 190, 220)  # each image is one grey level: its identity


def write_images(root, values, sidecars=True):
  """8x8 grey images, one per value; sidecar captions (which a prompt must override) on all but the last."""
  root.mkdir()
  for j, v in enumerate(values):
    (root / f"{j}.png").write_bytes(png(np.full((8, 8, 3), v, np.uint8)))
    if sidecars and j == 0:
      (root / f"{j}.json").write_text(json.dumps({"captions": ["json caption", "other"], "clip_scores": [1, 1]}))
    elif sidecars and j < len(values) - 1:
      (root / f"{j}.txt").write_text(f"sidecar {j}")
  return str(root)


def grey(batch):
  """Each row's grey level, from the images ([-1, 1]) or from fake_encoders' latents (times 0.5)."""
  x = batch["images"] if "images" in batch else batch["latents"] / 0.5
  return np.rint((x[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()


def config(tmp_path, **kw):
  return dict(source=f"folder:{write_images(tmp_path / 'dog', INSTANCE_VALUES)}", buckets=[(8, 8)],
              spatial_compression=8, with_index=True, **kw)


def with_classes(tmp_path, **kw):
  return config(tmp_path, instance_prompt=DOG, class_source=f"folder:{write_images(tmp_path / 'dogs', CLASS_VALUES)}",
                class_prompt=CLASS, **kw)


def test_instance_prompt_replaces_every_caption(tmp_path):
  cfg = config(tmp_path)
  plain = take(data.make_train_iterator(cfg, global_batch=3, seed=0), 2)
  assert {c for b in plain for c in b["captions"]} >= {"sidecar 1", ""}  # sidecars, and none for the last image
  batches = take(data.make_train_iterator({**cfg, "instance_prompt": DOG}, global_batch=3, seed=0), 4)
  assert all(list(b["captions"]) == [DOG] * 3 for b in batches)
  assert sorted(grey(batches[0])) == list(INSTANCE_VALUES)


def test_repeats_multiply_the_epoch(tmp_path):
  cfg = config(tmp_path, instance_prompt=DOG, repeats=4)
  assert len(data.make_source(data.resolve(cfg), seed=0, split="train", table=[(1.0, 8, 8)])) == 12
  it = data.make_train_iterator(cfg, global_batch=2, seed=1)
  epochs = [take(it, 6) for _ in range(2)]  # 3 images x 4 repeats / 2 per batch
  for batches in epochs:
    values = [v for b in batches for v in grey(b)]
    assert collections.Counter(values) == {v: 4 for v in INSTANCE_VALUES}
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(12))  # copy k of image j is example k * 3 + j
    assert values == [INSTANCE_VALUES[i % 3] for i in index]
  assert not np.array_equal(*(np.concatenate([b["index"] for b in e]) for e in epochs))  # reshuffled


def test_class_images_come_with_the_class_prompt(tmp_path):
  it = data.make_train_iterator(with_classes(tmp_path, repeats=2), global_batch=2, seed=0)
  for _ in range(2):  # epochs of 3 x 2 instance + 4 class rows, 2 per batch, sidecars ignored throughout
    batches = take(it, 5)
    rows = [(v, c) for b in batches for v, c in zip(grey(b), b["captions"])]
    assert collections.Counter(rows) == {**{(v, DOG): 2 for v in INSTANCE_VALUES},
                                         **{(v, CLASS): 1 for v in CLASS_VALUES}}
    assert any(len(set(b["captions"])) == 2 for b in batches)  # the two kinds share batches


def test_resume_gives_the_same_next_batches(tmp_path):
  cfg = with_classes(tmp_path, repeats=2)  # 3 x 2 + 4 = 10 rows: 5 batches of 2 per epoch
  it = data.make_train_iterator(cfg, global_batch=2, seed=3)
  take(it, 7)  # past the epoch boundary
  state = json.loads(json.dumps(it.get_state()))
  want = take(it, 4)
  resumed = data.make_train_iterator(cfg, global_batch=2, seed=3)
  resumed.set_state(state)
  assert all(same(x, y) for x, y in zip(want, take(resumed, 4)))
  with pytest.raises(SanaError, match="another data pipeline"):
    data.make_train_iterator({**cfg, "repeats": 3}, global_batch=2, seed=3).set_state(state)


def test_precompute_cli_writes_the_prompts_into_records(tmp_path, monkeypatch, capsys):
  encode_images, encode_captions = fake_encoders()
  monkeypatch.setattr(precompute, "load_encoders", lambda model, **kw: (encode_images, encode_captions, None, 0.5, 2))
  dog, dogs, out = write_images(tmp_path / "dog", INSTANCE_VALUES), write_images(tmp_path / "dogs", CLASS_VALUES), \
      tmp_path / "out"
  assert precompute.main(["--images", dog, "--model", "M", "--out", str(out), "--square", "--resolution", "32",
                          "--batch-size", "2", "--instance-prompt", DOG, "--class-images", dogs,
                          "--class-prompt", CLASS]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 7
  meta = records.read_metadata(str(out))
  assert (meta["instance_prompt"], meta["class_prompt"]) == (DOG, CLASS)
  source = records.LatentRecordSource(str(out), seed=0, tau=0.1, caption_length=8, caption_channels=5,
                                      latent_channels=4)
  stored = [records.unpack(source._reader[i]) for i in range(len(source))]
  assert [r["captions"] for r in stored] == [[DOG]] * 3 + [[CLASS]] * 4
  assert meta["class_examples"] == [3, 4, 5, 6]
  # training on the records: instance records `repeats` times per epoch, class records once, each with its prompt
  cfg = dict(source=f"array_record:{out}", latent_channels=4, caption_length=8, caption_channels=5, repeats=2)
  it = data.make_train_iterator(cfg, global_batch=5, seed=0)
  batches = take(it, 2)  # 3 x 2 + 4 = 10 rows
  rows = [(v, int(y[0, 0])) for b in batches for v, y in zip(grey(b), b["y"])]
  assert collections.Counter(rows) == {**{(v, len(DOG)): 2 for v in INSTANCE_VALUES},
                                       **{(v, len(CLASS)): 1 for v in CLASS_VALUES}}


def test_precompute_lists_class_records_across_buckets(tmp_path):
  encode_images, encode_captions = fake_encoders()
  dog, dogs = write_images(tmp_path / "dog", INSTANCE_VALUES), write_images(tmp_path / "dogs", CLASS_VALUES)
  for folder in (tmp_path / "dog", tmp_path / "dogs"):  # a wide image each: class records in both buckets
    (folder / "wide.png").write_bytes(png(np.full((8, 16, 3), 250, np.uint8)))
  meta = precompute.precompute(dog, str(tmp_path / "out"), encode_images=encode_images,
                               encode_captions=encode_captions, scaling_factor=0.5, buckets=[(8, 8), (8, 16)],
                               spatial_compression=2, batch_size=2, instance_prompt=DOG, class_images=dogs,
                               class_prompt=CLASS)
  source = records.LatentRecordSource(str(tmp_path / "out"), seed=0, tau=0.1, caption_length=8, caption_channels=5,
                                      latent_channels=4)
  captions = [records.unpack(source._reader[i])["captions"][0] for i in range(len(source))]
  assert meta["count"] == 9 and captions.count(CLASS) == 5 and captions.count(DOG) == 4
  assert meta["class_examples"] == [i for i, c in enumerate(captions) if c == CLASS] != list(range(4, 9))


def test_precompute_instance_prompt_alone(tmp_path):
  encode_images, encode_captions = fake_encoders()
  meta = precompute.precompute(write_images(tmp_path / "dog", INSTANCE_VALUES), str(tmp_path / "out"),
                               encode_images=encode_images, encode_captions=encode_captions, scaling_factor=0.5,
                               buckets=[(8, 8)], spatial_compression=2, batch_size=2, all_captions=True,
                               instance_prompt=DOG)
  assert meta["count"] == 3 and "class_examples" not in meta
  source = records.LatentRecordSource(str(tmp_path / "out"), seed=0, tau=0.1, caption_length=8, caption_channels=5,
                                      latent_channels=4)
  assert all(records.unpack(source._reader[i])["captions"] == [DOG] for i in range(3))


@pytest.mark.parametrize("kw, match", [
    (dict(instance_prompt=""), "instance_prompt must be a non-empty string"),
    (dict(instance_prompt=3), "instance_prompt must be a non-empty string"),
    (dict(repeats=0), r"repeats must be an integer in \[1, 10000\]"),
    (dict(repeats=10001), "repeats must be an integer"),
    (dict(repeats=2.0), "repeats must be an integer"),
    (dict(repeats=True), "repeats must be an integer"),
    (dict(class_source="folder:x"), "needs data.class_prompt"),
    (dict(class_prompt="dog"), "without data.class_source"),
    (dict(class_source="array_record:x", class_prompt="dog"), "class_source must be 'folder:DIR'"),
    (dict(class_source="folder:x", class_prompt=" "), "class_prompt must be a non-empty string"),
    (dict(source="synthetic", instance_prompt="dog"), "instance_prompt needs a folder:DIR source"),
    (dict(source="array_record:x", class_source="folder:x", class_prompt="dog"), "class_source needs a folder:DIR"),
])
def test_bad_values_are_one_line_errors(kw, match):
  with pytest.raises(SanaError, match=match) as e:
    data.resolve({"source": "folder:photos", **kw})
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, match", [
    (["--instance-prompt", ""], "--instance-prompt must be a non-empty string"),
    (["--class-images", "{dir}"], "go together"),
    (["--class-prompt", "dog"], "go together"),
    (["--class-images", "{dir}/missing", "--class-prompt", "dog"], "is not a directory"),
    (["--images", "tfds:x", "--instance-prompt", "dog"], "needs an image folder"),
])
def test_precompute_flag_errors_are_one_line(tmp_path, capsys, flags, match):
  flags = [f.replace("{dir}", str(tmp_path)) for f in flags]
  images = [] if "--images" in flags else ["--images", str(tmp_path)]
  assert precompute.main(images + flags + ["--model", "M", "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and err.count("\n") == 1
