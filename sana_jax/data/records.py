"""Precomputed training examples in ArrayRecord files: the record format, the writer and the source.

A dataset directory holds `sana_latents.json` (metadata) and ArrayRecord shards, one group of shards
per bucket, `latents-{H}x{W}-{shard:05d}.array_record` (written with group_size:1 for random access;
`latents-{H}x{W}-p{process:05d}-{shard:05d}.array_record` when several processes wrote them).
Each record is a msgpack map (arrays as {"__nd__": 1, "dtype": numpy dtype str, "shape": [...],
"data": raw bytes}, C order):

  latents   [h, w, c] float16 or float32   DC-AE latents, NHWC, already times the scaling factor
  control   [h, w, c] as latents           optional: the condition image's latents (same encoder and
                                           scale) for ControlNet training; metadata "control" says
                                           what the condition is ("edge", "images:DIR")
  y         [K, n, Dy] as latents          text-encoder output for K captions; rows past the last
                                           real token of every caption are dropped (n <= L)
  mask      [K, n] uint8                   1 = real token
  scores    [K] float32                    caption scores; one caption is drawn per epoch with
                                           weight score^(1/tau)
  captions  [K] str                        the caption texts (for inspection)
  key       str                            source id (file name or TFDS key)
  size      [H, W]                         bucket size in pixels

The reader pads y and mask back to L = caption_length with zeros (the DiT's cross-attention masks
padded keys, so their values do not matter).

Beside them, `null_text.msgpack` holds the text encoder's output for the empty caption (without the
complex human instruction, as the reference computes it), the unconditional embedding that caption
dropout substitutes: {"y": [L, Dy] float32, "mask": [L] uint8}, every row kept (the reference swaps
y alone and keeps the caption's mask, so the padding's hidden states are used).

Metadata (JSON): {"format": "sana-latents", "version": 1, "count", "skipped", "skipped_examples",
"latent_channels", "caption_length", "caption_channels", "latent_dtype", "scaling_factor",
"spatial_compression", "captions", "control" (with control latents only), "buckets": [{"size": [H, W],
"latent_shape": [h, w, c], "count", "files": [{"path", "count"}]}], ...}. The global index runs over the
buckets' files in order.
"""
import glob
import json
import logging
import os

import msgpack
import numpy as np

from sana_jax.data import images
from sana_jax.errors import SanaError

log = logging.getLogger(__name__)
FORMAT, VERSION, METADATA = "sana-latents", 1, "sana_latents.json"
NULL_TEXT = "null_text.msgpack"  # the empty caption's encoding, without CHI


def _encode(obj):
  if isinstance(obj, np.ndarray):
    obj = np.ascontiguousarray(obj)
    return {"__nd__": 1, "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialise {type(obj).__name__}")


def _decode(obj):
  if obj.get("__nd__") == 1:
    return np.frombuffer(obj["data"], np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj


def pack(example):
  return msgpack.packb(example, default=_encode, use_bin_type=True)


def unpack(data):
  return msgpack.unpackb(data, object_hook=_decode, raw=False)


def make_record(latents, y, mask, *, captions, scores, key, size, latent_dtype=np.float16, control=None):
  """One record from scaled latents [h, w, c], y [K, L, Dy] (or [L, Dy]) and mask [K, L] (or [L]);
  `control`: the condition's scaled latents, shaped as `latents`, or None."""
  y, mask = np.asarray(y), np.asarray(mask)
  if y.ndim == 2:
    y, mask = y[None], mask[None]
  real = np.nonzero(mask.any(axis=0))[0]
  n = int(real[-1]) + 1 if len(real) else 1
  latents = np.asarray(latents).astype(latent_dtype)
  record = {"latents": latents, "y": y[:, :n].astype(latent_dtype), "mask": (mask[:, :n] != 0).astype(np.uint8),
            "scores": np.asarray(scores, np.float32).reshape(-1), "captions": list(captions), "key": str(key),
            "size": [int(size[0]), int(size[1])]}
  if control is not None:
    control = np.asarray(control).astype(latent_dtype)
    if control.shape != latents.shape:
      raise ValueError(f"control latents of shape {control.shape}, the latents' is {latents.shape}")
    record["control"] = control
  return pack(record)


def decode_example(raw, *, latent_shape, caption_length, caption_channels, tau, seed, epoch, index, control=False):
  """Record bytes -> {"latents" [h, w, c], "y" [n, Dy], "mask" [n]} with this epoch's caption, and with
  `control` its "control" [h, w, c]. Raises ValueError for a record that does not match the dataset's
  shapes, or that has no control latents when asked for them."""
  r = unpack(raw)
  latents, y, mask = r["latents"], r["y"], r["mask"]
  if tuple(latents.shape) != tuple(latent_shape):
    raise ValueError(f"latents of shape {latents.shape}, expected {tuple(latent_shape)}")
  if y.ndim != 3 or y.shape[2] != caption_channels or y.shape[1] > caption_length or mask.shape != y.shape[:2]:
    raise ValueError(f"y {y.shape} / mask {mask.shape} do not fit [K, <= {caption_length}, {caption_channels}]")
  k = images.choose_caption(r.get("scores", np.ones(len(y))), tau, seed, epoch, index) if len(y) > 1 else 0
  out = {"latents": latents, "y": y[k], "mask": mask[k]}
  if control:
    if "control" not in r:
      raise ValueError("a record without control latents")
    if tuple(r["control"].shape) != tuple(latent_shape):
      raise ValueError(f"control latents of shape {r['control'].shape}, expected {tuple(latent_shape)}")
    out["control"] = r["control"]
  return out


class ShardWriter:
  """Writes records into per-bucket rolling ArrayRecord shards under `directory`; with `process`, their
  names carry it (several processes writing into one directory)."""

  def __init__(self, directory, shard_size=1024, process=None):
    self.directory, self.shard_size = directory, shard_size
    self._infix = "" if process is None else f"p{process:05d}-"
    self._open, self._buckets = {}, {}  # size -> (writer, file entry); size -> bucket entry

  def write(self, size, latent_shape, record):
    from array_record.python.array_record_module import ArrayRecordWriter
    size = (int(size[0]), int(size[1]))
    bucket = self._buckets.setdefault(size, {"size": list(size), "latent_shape": list(latent_shape),
                                             "count": 0, "files": []})
    if size not in self._open or self._open[size][1]["count"] >= self.shard_size:
      self._close(size)
      name = f"latents-{size[0]}x{size[1]}-{self._infix}{len(bucket['files']):05d}.array_record"
      entry = {"path": name, "count": 0}
      bucket["files"].append(entry)
      self._open[size] = (ArrayRecordWriter(os.path.join(self.directory, name), "group_size:1"), entry)
    writer, entry = self._open[size]
    writer.write(record)
    entry["count"] += 1
    bucket["count"] += 1

  def _close(self, size):
    if size in self._open:
      self._open.pop(size)[0].close()

  def close(self):
    """Closes every shard; returns the buckets' metadata in a stable (size) order."""
    for size in list(self._open):
      self._close(size)
    return [self._buckets[s] for s in sorted(self._buckets)]


def write_null_text(directory, y, mask):
  y, mask = np.asarray(y, np.float32).reshape(-1, np.shape(y)[-1]), np.asarray(mask).reshape(-1)
  with open(os.path.join(directory, NULL_TEXT), "wb") as f:  # all L rows: the padding's states too
    f.write(pack({"y": y, "mask": (mask != 0).astype(np.uint8)}))


def read_null_text(directory, caption_length):
  """(y f32 [L, Dy], mask i32 [L]) from a dataset directory, or None if it has none."""
  path = os.path.join(directory, NULL_TEXT)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    r = unpack(f.read())
  n = len(r["mask"])
  if n > caption_length:
    raise SanaError(f"{path}: {n} tokens, more than caption_length={caption_length}")
  y, mask = np.zeros((caption_length, r["y"].shape[-1]), np.float32), np.zeros(caption_length, np.int32)
  y[:n], mask[:n] = r["y"], r["mask"]
  return y, mask


def read_metadata(directory):
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise SanaError(f"{path}: not a {FORMAT} v{VERSION} metadata file")
  return meta


def _no_control(spec):
  return SanaError(f"{spec}: the records have no control latents (precompute with --control edge or "
                   "--control-images DIR)")


class LatentRecordSource:
  """Precomputed latents and text embeddings from ArrayRecord files (see the module docstring).

  spec: a directory written by `precompute` (uses its metadata, opens no record up front), or a
  directory / glob of ArrayRecord files without metadata (every record is read once to learn its
  latent shape: fine for small sets only). control: also load each record's control latents (the
  dataset must have them; a record without them is a bad example).
  """
  kind = "latents"
  scan_skipped = 0  # records in no bucket (unreadable when scanned): never loaded

  def __init__(self, spec, *, seed, tau, caption_length, caption_channels, latent_channels, control=False):
    import grain
    self.seed, self.tau, self.control = seed, tau, control
    self.caption_length, self.caption_channels = caption_length, caption_channels
    meta = read_metadata(spec) if os.path.isdir(spec) else None
    if meta is not None:
      paths = [os.path.join(spec, f["path"]) for b in meta["buckets"] for f in b["files"]]
      self.buckets = [tuple(b["latent_shape"]) for b in meta["buckets"]]
      self.bucket_ids = np.repeat(np.arange(len(self.buckets), dtype=np.int32), [b["count"] for b in meta["buckets"]])
      for name, want in (("caption_channels", caption_channels), ("latent_channels", latent_channels)):
        if meta[name] != want:
          raise SanaError(f"{spec}: the records have {name}={meta[name]}, the config asks for {want}")
      if meta["caption_length"] > caption_length:
        raise SanaError(f"{spec}: the records hold up to {meta['caption_length']} caption tokens, "
                        f"more than caption_length={caption_length}")
      if control and not meta.get("control"):
        raise _no_control(spec)
    else:
      paths = sorted(glob.glob(os.path.join(spec, "*.array_record*")) if os.path.isdir(spec) else glob.glob(spec))
      if not paths:
        raise SanaError(f"array_record source {spec!r}: no ArrayRecord files found")
    self.paths = paths
    self._reader = grain.sources.ArrayRecordDataSource(paths)
    if meta is None:
      if not self._scan(latent_channels) and control:
        raise _no_control(spec)
    if len(self.bucket_ids) != len(self._reader):
      raise SanaError(f"{spec}: metadata lists {len(self.bucket_ids)} records, the files hold {len(self._reader)}")

  def _scan(self, latent_channels):
    """Buckets from every record's latent shape; returns whether any record has control latents."""
    log.warning("%d ArrayRecord files without %s: reading every record once for its shape", len(self.paths), METADATA)
    shapes, ids, has_control = {}, [], False
    for i in range(len(self._reader)):
      try:
        r = unpack(self._reader[i])
        shape = tuple(r["latents"].shape)
      except Exception:  # noqa: BLE001 - unreadable: in no bucket, counted as skipped
        ids.append(-1)
        continue
      ids.append(shapes.setdefault(shape, len(shapes)))
      has_control |= "control" in r
    self.buckets = list(shapes)
    self.bucket_ids = np.asarray(ids, np.int32)
    self.scan_skipped = int((self.bucket_ids < 0).sum())
    bad = [s for s in self.buckets if len(s) != 3 or s[-1] != latent_channels]
    if bad:
      raise SanaError(f"records with latent shape {bad[0]}; the config asks for {latent_channels} channels")
    return has_control

  def __len__(self):
    return len(self.bucket_ids)

  def load(self, index, epoch):
    return decode_example(self._reader[index], latent_shape=self.buckets[self.bucket_ids[index]],
                          caption_length=self.caption_length, caption_channels=self.caption_channels,
                          tau=self.tau, seed=self.seed, epoch=epoch, index=index, control=self.control)

  def describe(self, index):
    return f"record {index}"
