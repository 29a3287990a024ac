"""Pack an image folder with caption sidecars into ArrayRecord shards, read as `source="packed:OUT"`.

  python -m sana_jax.data.pack --images DIR --out OUT [--shard-size 1024] [--threads 8] [--overwrite]

At pod scale each host reads a few large shards (from object storage too, through grain's
ArrayRecordDataSource) instead of a POSIX folder of millions of files, and assigns buckets from one
array instead of opening every image for its header. The folder is read as the `folder:DIR` source
reads it (`folder.scan`: .txt / .json sidecars, several captions with clip_scores); every image is
decoded in full here, so a corrupt or truncated one is skipped and counted now, not met in training.
Records keep each file's own bytes (no re-encoding): `packed:OUT` yields the batches `folder:DIR`
yields for the same seed, when no image of the folder is bad.

OUT holds:
  sana_images.json    {"format": "sana-images", "version": 1, "count", "skipped", "skipped_examples" (the
                      first 100 keys), "source", "files": [{"path", "count"}]}; the global record index
                      runs over the files in order
  image_sizes.npy     int32 [count, 2]: each record's (height, width) as displayed (EXIF orientation
                      applied), in record order: a binary array, as a JSON list of millions of pairs
                      would be slow to load on every host
  images-{shard:05d}.array_record   records written with group_size:1 (random access), each a msgpack
                      map {"image": the file's bytes, "captions": [str], "scores": [float], "key": the path
                      in the folder, "size": [H, W]}
OUT appears whole or not at all.
"""
import concurrent.futures
import io
import json
import logging
import os
import stat
import sys
import time

import numpy as np

from sana_jax import files
from sana_jax.data import folder as folder_lib
from sana_jax.data import images, records
from sana_jax.errors import ArgumentParser, SanaError, cli_main, one_line

log = logging.getLogger(__name__)
FORMAT, VERSION, METADATA, SIZES = "sana-images", 1, "sana_images.json", "image_sizes.npy"


def _read_image(item):
  """(bytes, (height, width)) of a fully decodable image file, or (None, why not)."""
  try:
    mode = os.stat(item.path)
    if not stat.S_ISREG(mode.st_mode):  # a FIFO named x.jpg would hang the read
      return None, "not a regular file"
    if mode.st_size > images.MAX_IMAGE_BYTES:
      return None, f"larger than {images.MAX_IMAGE_BYTES >> 20} MiB"
    with open(item.path, "rb") as f:
      data = f.read()
    images.decode(data)  # every pixel: a truncated file fails here
    return data, images.header_size(io.BytesIO(data))  # the size FolderSource buckets by
  except Exception as e:  # noqa: BLE001 - any unreadable image is skipped and counted, never a crash
    return None, one_line(f"{type(e).__name__}: {e}", 200)


def _check_out(out, overwrite):
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise SanaError(f"--out {out} exists and is not empty (pass --overwrite to replace a previous output)")
    if not os.path.exists(os.path.join(out, METADATA)):
      raise SanaError(f"--out {out} is not a pack output (no {METADATA}); refusing to overwrite it")


def pack(images_dir, out, *, shard_size=1024, threads=8, overwrite=False):
  """Writes the readable images of folder `images_dir` with their captions to `out`; returns the metadata."""
  from array_record.python.array_record_module import ArrayRecordWriter
  if shard_size <= 0 or threads <= 0:
    raise SanaError(f"shard size {shard_size} and threads {threads} must be positive")
  source = os.path.abspath(os.path.expanduser(images_dir))
  out = os.path.abspath(os.path.expanduser(out))
  if out == source:
    raise SanaError("--out must differ from --images")
  _check_out(out, overwrite)
  items, bad = folder_lib.scan(source)
  if not items and not bad:
    raise SanaError(f"image folder {images_dir!r} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})")
  skipped, sizes, shards, writer = [key for key, _ in bad], [], [], None
  for key, reason in bad:
    log.warning("skipping %s: %s", key, reason)
  chunk, start = 4 * threads, time.time()  # images decoded ahead of the writer: bounded memory
  logged = start
  with files.atomic_directory(out) as tmp, concurrent.futures.ThreadPoolExecutor(threads) as pool:
    try:
      for first in range(0, len(items), chunk):
        part = items[first:first + chunk]
        for item, (data, found) in zip(part, pool.map(_read_image, part)):
          if data is None:
            log.warning("skipping %s: %s", item.key, found)
            skipped.append(item.key)
            continue
          if writer is None or shards[-1]["count"] >= shard_size:
            if writer is not None:
              writer.close()
            shards.append({"path": f"images-{len(shards):05d}.array_record", "count": 0})
            writer = ArrayRecordWriter(os.path.join(tmp, shards[-1]["path"]), "group_size:1")
          writer.write(records.pack({"image": data, "captions": list(item.captions),
                                     "scores": [float(s) for s in item.scores], "key": item.key, "size": list(found)}))
          shards[-1]["count"] += 1
          sizes.append(found)
        if time.time() - logged > 10:
          logged, done = time.time(), first + len(part)
          log.info("%d of %d images read (%.1f/s)", done, len(items), done / (logged - start))
    finally:
      if writer is not None:
        writer.close()
    if not sizes:
      raise SanaError(f"image folder {images_dir!r}: no readable image ({len(skipped)} skipped); nothing written")
    with open(os.path.join(tmp, SIZES), "wb") as f:
      np.save(f, np.asarray(sizes, np.int32).reshape(-1, 2), allow_pickle=False)
    meta = dict(format=FORMAT, version=VERSION, count=len(sizes), skipped=len(skipped), skipped_examples=skipped[:100],
                source=source, files=shards)
    files.write_json(os.path.join(tmp, METADATA), meta, indent=1)
  log.warning("%s: %d images packed, %d skipped", out, meta["count"], meta["skipped"])
  return meta


def _count(value):
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read(directory):
  """(metadata, sizes int32 [count, 2], shard paths) of a pack output; a missing or damaged one is a
  one-line SanaError (the files are untrusted: names stay inside `directory`, the array is never unpickled)."""
  if not os.path.isdir(directory):
    raise SanaError(f"packed images {directory!r}: not a directory")
  path = os.path.join(directory, METADATA)
  meta = files.read_json(path, "packed images metadata")
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise SanaError(f"{path}: not a {FORMAT} v{VERSION} metadata file")
  count, shards = meta.get("count"), meta.get("files")
  if not (_count(count) and count > 0 and isinstance(shards, list)
          and all(isinstance(s, dict) and _count(s.get("count")) for s in shards)
          and sum(s["count"] for s in shards) == count):
    raise SanaError(f"{path}: damaged: 'count' must be positive and the sum of the 'files' counts")
  paths = [files.regular_file(files.inside(directory, s.get("path"), "shard"), "shard") for s in shards]
  sizes_path = files.regular_file(os.path.join(directory, SIZES), "image sizes file")
  try:
    sizes = np.load(sizes_path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise SanaError(f"{sizes_path}: not a readable .npy array ({one_line(e, 100)})") from None
  if sizes.dtype.kind not in "iu" or sizes.shape != (count, 2) or sizes.min() <= 0:
    raise SanaError(f"{sizes_path}: expected positive integer sizes [{count}, 2], found {sizes.dtype} {sizes.shape}")
  return meta, sizes.astype(np.int32), paths


def parse_args(argv):
  p = ArgumentParser(prog="python -m sana_jax.data.pack", description=__doc__.split("\n\n")[0])
  p.add_argument("--images", required=True, help="image folder with caption sidecars (as for folder:DIR)")
  p.add_argument("--out", required=True, help="output directory (new, or a previous pack output with --overwrite)")
  p.add_argument("--shard-size", type=int, default=1024, help="images per ArrayRecord file")
  p.add_argument("--threads", type=int, default=8, help="threads reading and decoding images")
  p.add_argument("--overwrite", action="store_true")
  return p.parse_args(argv)


@cli_main
def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("sana_jax.data").setLevel(logging.INFO)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  meta = pack(args.images, args.out, shard_size=args.shard_size, threads=args.threads, overwrite=args.overwrite)
  print(json.dumps({"count": meta["count"], "skipped": meta["skipped"], "files": len(meta["files"])}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
