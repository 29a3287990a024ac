"""Example sources. Each is a picklable random-access table (grain workers unpickle their own copy):

  kind         "latents" (load -> latents [h, w, c], y [n, Dy], mask [n], with data.control control [h, w, c]) or
               "images"  (load -> image [H, W, 3] in [-1, 1], caption, captions, scores, key)
  bucket_ids   int32 [N]: each example's bucket, known without decoding it; -1 = in no bucket
               (found unreadable while scanning: never loaded, counted in `scan_skipped`)
  buckets      the buckets' shapes: latent [h, w, c], or pixel (H, W) for images
  load(index, epoch)   the example; any exception means a bad example (skipped and counted)

`make_source` wraps a source in `DreamBoothSource` for data.repeats > 1 or data.class_source.
"""
import logging
import os
import zlib

import numpy as np

from sana_jax.data import folder as folder_lib
from sana_jax.data import hashing, images, records
from sana_jax.data.buckets import nearest_bucket
from sana_jax.errors import SanaError

log = logging.getLogger(__name__)
_BANK = 1 << 22  # floats in the synthetic random bank (16 MiB)


class SyntheticSource:
  """Deterministic random latents and text embeddings, for benchmarks and smoke runs.

  Each array is a window, at an offset hashed from (seed, index), into one bank of standard normals
  generated once per process: the cost of an example is a memory copy. Examples are deterministic
  per (seed, index) but not independent of each other (windows overlap); buckets are hashed too.
  With control, "control" is sign(latents): a condition that a ControlNet can learn to use.
  """
  kind = "latents"
  scan_skipped = 0

  def __init__(self, size, *, table, spatial_compression, latent_channels, caption_length, caption_channels, seed,
               control=False):
    if size <= 0:
      raise SanaError(f"synthetic_size must be positive, got {size}")
    f = spatial_compression
    self.buckets = [(h // f, w // f, latent_channels) for _, h, w in table]
    self.bucket_ids = (hashing.hash64_array(seed, hashing.SYNTH_BUCKET, np.arange(size))
                       % np.uint64(len(self.buckets))).astype(np.int32)
    self.caption_length, self.caption_channels, self.seed = caption_length, caption_channels, seed
    self.control, self._bank = control, None

  def __getstate__(self):
    return {**self.__dict__, "_bank": None}  # regenerated in each worker, not pickled

  def _window(self, purpose, index, n):
    if self._bank is None:
      self._bank = np.random.default_rng(self.seed).standard_normal(_BANK, np.float32)
    bank = self._bank if n < _BANK else np.resize(self._bank, n + 1)
    start = hashing.hash64(self.seed, purpose, index) % (len(bank) - n)
    return bank[start:start + n]

  def __len__(self):
    return len(self.bucket_ids)

  def load(self, index, epoch):
    del epoch
    shape = self.buckets[self.bucket_ids[index]]
    n = 1 + hashing.hash64(self.seed, hashing.SYNTH_LENGTH, index) % self.caption_length  # real tokens
    out = {"latents": self._window(hashing.SYNTH_LATENTS, index, int(np.prod(shape))).reshape(shape),
           "y": self._window(hashing.SYNTH_Y, index, n * self.caption_channels).reshape(n, self.caption_channels),
           "mask": np.ones(n, np.uint8)}
    if self.control:
      out["control"] = np.sign(out["latents"])
    return out

  def describe(self, index):
    return f"synthetic example {index}"


def image_example(data, size, captions, scores, *, key, tau, seed, epoch, index):
  """Encoded image bytes -> the "images"-kind example, resized and cropped into `size` (H, W)."""
  pixels = images.resize_cover_crop(images.decode(data), *size)
  k = images.choose_caption(scores, tau, seed, epoch, index)
  return {"image": images.to_unit_range(pixels), "caption": captions[k], "choice": k, "captions": tuple(captions),
          "scores": np.asarray(scores, np.float32), "key": key}


class FolderSource:
  """Images with caption sidecars straight from a folder (see `folder.py`), or all with one `prompt`
  (DreamBooth); image headers are read once up front for the bucket assignment."""
  kind = "images"

  def __init__(self, path, *, table, seed, tau, prompt=None):
    self.items, bad = folder_lib.scan(path, prompt)
    self.table, self.seed, self.tau = table, seed, tau
    self.buckets = [(h, w) for _, h, w in table]
    ids = []
    for item in self.items:
      try:
        ids.append(nearest_bucket(*images.header_size(item.path), table))
      except Exception as e:  # noqa: BLE001 - any unreadable header: the image is skipped
        bad.append((item.key, f"image header: {e}"))
        ids.append(-1)
    for key, reason in bad:
      log.warning("skipping %s: %s", key, reason)
    self.bucket_ids = np.asarray(ids, np.int32)
    self.scan_skipped, self.skipped_examples = len(bad), [key for key, _ in bad]
    if not self.items:
      raise SanaError(f"image folder {path!r} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})")

  def __len__(self):
    return len(self.items)

  def load(self, index, epoch):
    item = self.items[index]
    with open(item.path, "rb") as f:
      data = f.read()
    return image_example(data, self.buckets[self.bucket_ids[index]], item.captions, item.scores, key=item.key,
                         tau=self.tau, seed=self.seed, epoch=epoch, index=index)

  def describe(self, index):
    return self.items[index].key


class PackedSource:
  """Images packed by `python -m sana_jax.data.pack`: FolderSource's examples over the packed folder (bad
  images left out at packing time), buckets from the sizes stored then, records read with grain's
  ArrayRecordDataSource instead of one file opened per image."""
  kind = "images"
  scan_skipped = 0  # bad images were skipped, and counted in the metadata, when packing

  def __init__(self, path, *, table, seed, tau):
    import grain

    from sana_jax.data import pack
    _, sizes, paths = pack.read(path)
    self.path, self.table, self.seed, self.tau = path, table, seed, tau
    self.buckets = [(h, w) for _, h, w in table]
    unique, inverse = np.unique(sizes, axis=0, return_inverse=True)  # a few thousand sizes among millions
    self.bucket_ids = np.asarray([nearest_bucket(int(h), int(w), table) for h, w in unique],
                                 np.int32)[inverse.reshape(-1)]
    self._reader = grain.sources.ArrayRecordDataSource(paths)
    if len(self._reader) != len(sizes):
      raise SanaError(f"{path}: metadata lists {len(sizes)} images, the files hold {len(self._reader)}")

  def __len__(self):
    return len(self.bucket_ids)

  def load(self, index, epoch):
    r = records.unpack(self._reader[index])
    captions, scores = r["captions"], r["scores"]
    if not (isinstance(r["image"], bytes) and isinstance(captions, list) and captions
            and all(isinstance(c, str) for c in captions) and len(scores) == len(captions)):
      raise ValueError("a damaged packed record")
    return image_example(r["image"], self.buckets[self.bucket_ids[index]], captions, scores, key=str(r["key"]),
                         tau=self.tau, seed=self.seed, epoch=epoch, index=index)

  def describe(self, index):
    return f"{self.path} record {index}"


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsImageSource:
  """A TFDS image dataset in ArrayRecord format, read with `tfds.data_source` (images left encoded
  and decoded here, so a bad one is skipped rather than failing the reader). Captions come from a
  `captions` sequence (with optional `scores`) or a single `caption` text feature; height and width
  features, when present, give the buckets without touching the image bytes' headers."""
  kind = "images"

  def __init__(self, name, *, data_dir, split, table, seed, tau):
    import tensorflow_datasets as tfds
    try:
      features = tfds.builder(name, data_dir=data_dir).info.features
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - missing dataset, split or file format: the user's to fix
      raise SanaError(f"cannot open TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r}): "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "image" not in features or not ({"captions", "caption"} & set(features)):
      raise SanaError(f"TFDS dataset {name!r} has features {sorted(features)}; expected 'image' and "
                      "'captions' (or 'caption'). Precomputed latents are read with source='array_record:DIR'")
    self.table, self.seed, self.tau = table, seed, tau
    self.buckets = [(h, w) for _, h, w in table]
    sized = {"height", "width"} <= set(features)
    ids = []
    for i in range(len(self._source)):
      ex = self._source[i]
      try:
        hw = (int(ex["height"]), int(ex["width"])) if sized else images.decode(ex["image"]).size[::-1]
        ids.append(nearest_bucket(*hw, table))
      except Exception:  # noqa: BLE001 - unreadable image: in no bucket
        ids.append(-1)
    self.bucket_ids = np.asarray(ids, np.int32)
    self.scan_skipped = int((self.bucket_ids < 0).sum())

  def __len__(self):
    return len(self._source)

  def load(self, index, epoch):
    ex = self._source[index]
    captions = [_text(c) for c in ex["captions"]] if "captions" in ex else [_text(ex["caption"])]
    scores = list(ex.get("scores", [])) or [1.0] * len(captions)
    if not captions or len(scores) != len(captions):
      raise ValueError(f"{len(captions)} captions, {len(scores)} scores")
    return image_example(ex["image"], self.buckets[self.bucket_ids[index]], captions, scores,
                         key=_text(ex.get("key", index)), tau=self.tau, seed=self.seed, epoch=epoch, index=index)

  def describe(self, index):
    return f"TFDS example {index}"


class DreamBoothSource:
  """Instance examples `copies` times per epoch, plus prior-preservation class examples once each.

  parts: [(source, indices, copies, is_class)], sources of one kind and one bucket list. Example ids
  run part by part, copy by copy: copy k of the j-th of a part's n indices is id offset + k * n + j
  (what `with_index` reports). The epoch plan over these ids is as deterministic and resumable as any;
  copy k loads as in epoch `epoch * copies + k`, so copies draw their captions (of several) apart.

  Prior preservation: diffusers' train_dreambooth_lora_sana.py stacks b instance rows on b class rows
  (their shorter set cycled, so the two are 1:1) and minimises mean(instance losses) + prior_loss_weight
  * mean(class losses). Here the M class rows share epochs and batches with the N * repeats instance rows
  at random, and the loss is the mean over all rows: with M = N * repeats that is, in expectation,
  diffusers' loss with prior_loss_weight 1 (up to its constant factor 2, which Adam-type updates
  normalise away); in general the class term weighs M / (N * repeats) against the instance term.
  """

  def __init__(self, parts):
    first = parts[0][0]
    if any(p[0].kind != first.kind or p[0].buckets != first.buckets for p in parts):
      raise SanaError("DreamBooth parts of different kinds or buckets")
    self.kind, self.buckets, self.sources = first.kind, first.buckets, [p[0] for p in parts]
    part, base, copy, copies, is_class = [], [], [], [], []
    for i, (_, indices, n_copies, cls) in enumerate(parts):
      indices = np.asarray(indices, np.int64)
      part.append(np.full(len(indices) * n_copies, i, np.int8))
      base.append(np.tile(indices, n_copies))
      copy.append(np.repeat(np.arange(n_copies, dtype=np.int32), len(indices)))
      copies.append(n_copies)
      is_class.append(np.full(len(indices) * n_copies, bool(cls)))
    self._part, self._base, self._copy = np.concatenate(part), np.concatenate(base), np.concatenate(copy)
    self._copies = copies
    self.class_mask = np.concatenate(is_class)  # precompute records which written examples are class images
    self.bucket_ids = np.concatenate([p[0].bucket_ids[b] for p, b in zip(parts, base)]).astype(np.int32)
    unique = list({id(s): s for s in self.sources}.values())
    self.scan_skipped = sum(s.scan_skipped for s in unique)
    self.skipped_examples = [k for s in unique for k in getattr(s, "skipped_examples", [])]

  def __len__(self):
    return len(self.bucket_ids)

  def load(self, index, epoch):
    p, k = self._part[index], int(self._copy[index])
    return self.sources[p].load(int(self._base[index]), epoch * self._copies[p] + k)

  def describe(self, index):
    p = self._part[index]
    return self.sources[p].describe(int(self._base[index])) + (" (class image)" if self.class_mask[index] else "")


def dreambooth(instance, repeats=1, classes=None, class_indices=()):
  """`instance` with its examples `repeats` times per epoch, plus the examples of `classes` (another
  source) or `class_indices` (class examples of `instance` itself: precomputed records) once each; just
  `instance` when neither changes anything."""
  class_indices = np.asarray(class_indices, np.int64)
  if classes is None and (repeats == 1 or len(class_indices) == len(instance)):
    return instance
  own = np.setdiff1d(np.arange(len(instance)), class_indices)
  parts = [(instance, own, repeats, False)]
  if len(class_indices):
    parts.append((instance, class_indices, 1, True))
  if classes is not None:
    parts.append((classes, np.arange(len(classes)), 1, True))
  return DreamBoothSource(parts)


def _class_examples(path):
  """The class images' record indices that precompute --class-images listed in the metadata."""
  from sana_jax.data.records import read_metadata
  meta = read_metadata(path) if os.path.isdir(path) else None
  found = (meta or {}).get("class_examples", [])
  if not (isinstance(found, list) and all(isinstance(i, int) and 0 <= i < meta["count"] for i in found)):
    raise SanaError(f"{path}: metadata class_examples must list record indices below count")
  return found


def make_source(c, *, seed, split, table):
  """The source named by config `c.source` (see `config.py`) for `split`, DreamBooth settings applied.

  Splits: TFDS's own; array_record:DIR and packed:DIR use DIR/SPLIT when that holds such an output,
  else DIR (with a warning for a split other than train); synthetic data draws another split from
  another seed.
  """
  from sana_jax.data import pack
  from sana_jax.data.records import METADATA, LatentRecordSource
  kind, _, arg = c.source.partition(":")
  if kind == "synthetic":
    if split != "train":
      seed = hashing.hash64(seed, zlib.crc32(split.encode())) % 2**31
    return dreambooth(SyntheticSource(c.synthetic_size, table=table, spatial_compression=c.spatial_compression,
                                      latent_channels=c.latent_channels, caption_length=c.caption_length,
                                      caption_channels=c.caption_channels, seed=seed, control=c.control),
                      c.repeats)
  if kind in ("array_record", "folder", "packed") and arg:
    path = os.path.expanduser(arg)
    marker = {"array_record": METADATA, "packed": pack.METADATA}.get(kind)
    if marker and os.path.exists(os.path.join(path, split, marker)):
      path = os.path.join(path, split)
    elif split != "train":
      log.warning("%s has no %r split: reading the whole source for it", arg, split)
    if kind == "folder":
      instance = FolderSource(path, table=table, seed=seed, tau=c.caption_tau, prompt=c.instance_prompt)
      classes = None if c.class_source is None else FolderSource(
          os.path.expanduser(c.class_source[len("folder:"):]), table=table, seed=seed, tau=c.caption_tau,
          prompt=c.class_prompt)
      return dreambooth(instance, c.repeats, classes)
    if kind == "packed":
      return dreambooth(PackedSource(path, table=table, seed=seed, tau=c.caption_tau), c.repeats)
    latents = LatentRecordSource(path, seed=seed, tau=c.caption_tau, caption_length=c.caption_length,
                                 caption_channels=c.caption_channels, latent_channels=c.latent_channels,
                                 control=c.control)
    return dreambooth(latents, c.repeats, class_indices=_class_examples(path) if c.repeats > 1 else ())
  if kind == "tfds" and arg:
    return dreambooth(TfdsImageSource(arg, data_dir=c.data_dir, split=split, table=table, seed=seed,
                                      tau=c.caption_tau), c.repeats)
  raise SanaError(f"data source {c.source!r}; expected 'synthetic', 'array_record:DIR_OR_GLOB', 'tfds:NAME', "
                  "'folder:DIR' or 'packed:DIR'")
