"""Encode an image dataset once: DC-AE latents (times the scaling factor) and text embeddings, written
as ArrayRecord shards + metadata that `source="array_record:OUT"` trains from (format: `records`).

  python -m sana_jax.data.precompute --images DIR|packed:DIR|tfds:NAME --model DIFFUSERS_DIR --out DIR \
      [--resolution 512] [--batch-size 16] [--all-captions]
      [--instance-prompt TEXT] [--class-images DIR --class-prompt TEXT]   # DreamBooth
      [--control edge | --control-images DIR]                             # ControlNet
      [--process-index I --process-count N | --distributed]               # several hosts

--images: a folder with caption sidecars, `packed:DIR` (the folder packed by `python -m sana_jax.data.pack`),
or `tfds:NAME`. Images go through the training transform (nearest aspect bucket of `--resolution`,
resize-cover, centre crop), in order, bucket by bucket. Unreadable images are skipped and counted; the
output appears only when complete.

Several processes (hosts) share the encoding when given --process-index/--process-count, or --distributed
(jax.distributed.initialize(), its process index and count), all with the same flags and --out on a shared
filesystem: each bucket's batches (as one process cuts them) are split into N contiguous runs and process p
encodes run p of every bucket into its own shards in OUT.partial (every batch, so every record, is the one
a single process encodes), then leaves a marker with its part of the metadata. Process 0 waits for every
marker (--wait-timeout), merges them (each bucket's files in process order, so the global record order is
a single process's) and renames the result to OUT; a failed or missing process leaves no OUT.

DreamBooth: --instance-prompt is the caption of every --images folder image (sidecars ignored);
--class-images are written into the same records with --class-prompt, and the metadata lists them
(`class_examples`), so training with data.repeats repeats only the instance images (see
`sources.DreamBoothSource` for the prior-preservation semantics).

ControlNet: each record also holds the latents of its condition image (`control`, encoded as the
image is), made with --control edge from the transformed image (`controls.edge_map`) or read with
--control-images from a folder of condition images named as the --images folder's images and
transformed as they are; an example whose condition image cannot be read is skipped.
"""
import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time

import numpy as np

from sana_jax import controls, files
from sana_jax.data import images as images_lib
from sana_jax.data import loader, records
from sana_jax.data.buckets import bucket_table
from sana_jax.data.config import check_prompt
from sana_jax.data.plan import Plans
from sana_jax.data.sources import FolderSource, PackedSource, TfdsImageSource, dreambooth
from sana_jax.errors import ArgumentParser, SanaError, cli_main, short

log = logging.getLogger(__name__)
RUN, DONE = "run.json", "process-{:05d}.json"  # in OUT.partial: process 0's start, process p's completion


def image_source(images, *, data_dir=None, split="train", table, seed=0, tau=0.1, prompt=None):
  """`tfds:NAME` -> a TFDS image dataset; `packed:DIR` -> a folder packed by `pack`; a directory -> an
  image folder with caption sidecars (or all captioned `prompt`)."""
  if images.startswith(("tfds:", "packed:")):
    if prompt is not None:
      raise SanaError("--instance-prompt needs an image folder for --images, not tfds:NAME or packed:DIR")
    if images.startswith("packed:"):
      return PackedSource(os.path.expanduser(images[len("packed:"):]), table=table, seed=seed, tau=tau)
    return TfdsImageSource(images[5:], data_dir=data_dir, split=split, table=table, seed=seed, tau=tau)
  if os.path.isdir(images):
    return FolderSource(images, table=table, seed=seed, tau=tau, prompt=prompt)
  raise SanaError(f"--images {images!r}: neither a directory, packed:DIR nor tfds:NAME")


def check_dreambooth(images, instance_prompt=None, class_images=None, class_prompt=None):
  """One-line errors for DreamBooth flags that do not fit together, before any model loads."""
  folder = not str(images).startswith(("tfds:", "packed:"))
  if instance_prompt is not None:
    check_prompt("--instance-prompt", instance_prompt)
    if not folder:
      raise SanaError("--instance-prompt needs an image folder for --images, not tfds:NAME or packed:DIR")
  if (class_images is None) != (class_prompt is None):
    raise SanaError("--class-images and --class-prompt go together")
  if class_images is not None:
    check_prompt("--class-prompt", class_prompt)
    if not folder:
      raise SanaError("--class-images needs an image folder for --images, not tfds:NAME or packed:DIR")
    if not os.path.isdir(os.path.expanduser(class_images)):
      raise SanaError(f"--class-images {class_images!r} is not a directory")


def check_control(images, control, class_images=None):
  """One-line errors for a `control` (None, "edge" or "images:DIR") that does not fit, before any model loads."""
  if control is None or control == "edge":
    return
  folder = control[len("images:"):] if isinstance(control, str) and control.startswith("images:") else ""
  if not folder:
    raise SanaError(f"control {short(control)}: expected 'edge' or 'images:DIR'")
  if str(images).startswith("tfds:"):  # a packed folder's keys are its images' names: they find theirs in DIR
    raise SanaError("--control-images needs an image folder (or packed:DIR) for --images, not tfds:NAME")
  if class_images is not None:
    raise SanaError("--control-images does not go with --class-images (the class images have no condition images)")
  if not os.path.isdir(os.path.expanduser(folder)):
    raise SanaError(f"--control-images {folder!r} is not a directory")


def _keep_all(examples, caption_length=None, control=None):
  """The images stacked and the examples kept; with `control`, "control": the condition images."""
  del caption_length
  out = {"images": np.stack([e.pop("image") for e in examples]), "examples": examples}
  if control is not None:
    out["control"] = np.stack([_condition(control, image, e) for image, e in zip(out["images"], examples)])
  return out


def _condition(control, image, example):
  """The condition image of `image` [H, W, 3] in [-1, 1], in the same range and size; where it cannot
  be read, zeros and the reason in example["bad"] (the example is then skipped)."""
  if control == "edge":
    return controls.edge_map((image + 1) / 2) * 2 - 1
  path = os.path.join(os.path.expanduser(control[len("images:"):]), example["key"])
  try:
    pixels = images_lib.resize_cover_crop(images_lib.load(path, "condition image"), *image.shape[:2])
  except Exception as e:  # noqa: BLE001 - any unreadable condition image: the example is skipped
    example["bad"] = str(e) or type(e).__name__
    return np.zeros_like(image)
  return images_lib.to_unit_range(pixels)


def processes(process_index=None, process_count=None):
  """(index, count) of this process among those sharing a precompute: as given; else jax.distributed's
  when it is initialised; else (0, 1)."""
  if process_index is None and process_count is None:
    import jax
    if getattr(jax.distributed, "is_initialized", lambda: False)():
      return jax.process_index(), jax.process_count()
    return 0, 1
  if process_index is None or process_count is None:
    raise SanaError("--process-index and --process-count go together")
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in (process_index, process_count)) or \
      not 0 <= process_index < process_count:
    raise SanaError(f"--process-index {short(process_index)} must be an integer in [0, --process-count "
                    f"{short(process_count)})")
  return process_index, process_count


def precompute(images, out, *, encode_images, encode_captions, scaling_factor, buckets, null_text=None,
               spatial_compression=32, batch_size=16, data_dir=None, split="train", all_captions=False, tau=0.1, seed=0,
               latent_dtype="float16", shard_size=1024, overwrite=False, read_threads=2, extra_metadata=None,
               instance_prompt=None, class_images=None, class_prompt=None, control=None, process_index=None,
               process_count=None, wait_timeout=3600.0):
  """Writes the dataset to `out`; returns its metadata (in process 0; in the others their part of it).

  encode_images(images f32 [B, H, W, 3] in [-1, 1]) -> unscaled latents [B, H/f, W/f, C];
  encode_captions(list of B str) -> (y [B, L, Dy], mask [B, L]). The CLI builds both from a
  diffusers-format model directory (`load_encoders`); tests inject small ones.
  null_text: (y [L, Dy], mask [L]) of the empty caption, stored for caption dropout (`data.null_text`).
  With all_captions every caption of an image is encoded (chosen per epoch when training), else one,
  drawn with weight score^(1/tau) as for epoch 0.
  instance_prompt: the caption of every image of the `images` folder; class_images (a folder) with
  class_prompt: prior-preservation images written into the same records (DreamBooth).
  control: None; "edge" (each image's `controls.edge_map`) or "images:DIR" (the same-named image of
  folder DIR) as the condition whose latents each record holds (ControlNet training).
  process_index, process_count: this process's share of a run of several (see the module docstring;
  default: `processes()`), all called alike with the same `out`; wait_timeout: seconds process 0 waits
  for the others once its share is done (and the others for process 0 to start the run).
  """
  check_dreambooth(images, instance_prompt, class_images, class_prompt)
  check_control(images, control, class_images)
  index, count = processes(process_index, process_count)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise SanaError(f"--out {out} exists and is not empty (pass --overwrite to replace a previous output)")
    if records.read_metadata(out) is None:
      raise SanaError(f"--out {out} is not a precompute output; refusing to overwrite it")
  if batch_size <= 0 or shard_size <= 0:
    raise SanaError(f"batch size {batch_size} and shard size {shard_size} must be positive")
  if not wait_timeout > 0:
    raise SanaError(f"wait timeout {short(wait_timeout)} must be a positive number of seconds")
  table = bucket_table(buckets, 1, spatial_compression)
  given = dict(instance_prompt=instance_prompt, class_images=class_images, class_prompt=class_prompt, control=control)
  settings = dict(source=images, resolution_buckets=[[h, w] for _, h, w in table], scaling_factor=float(scaling_factor),
                  spatial_compression=spatial_compression, captions="all" if all_captions else "one", tau=tau,
                  seed=seed, **{k: v for k, v in given.items() if v is not None}, **(extra_metadata or {}))

  def make_source():
    source = image_source(images, data_dir=data_dir, split=split, table=table, seed=seed, tau=tau,
                          prompt=instance_prompt)
    if class_images is None:
      return source
    return dreambooth(source, classes=FolderSource(os.path.expanduser(class_images), table=table, seed=seed, tau=tau,
                                                   prompt=class_prompt))

  def encode_share(source, directory, process=None):
    share = _share(source.bucket_ids, len(table), batch_size, index, count)
    return _write(source, share, batch_size, seed, control, directory, encode_images, encode_captions,
                  scaling_factor, all_captions, np.dtype(latent_dtype), shard_size, read_threads, process)

  def finish(directory, source, parts):
    meta = _metadata(source, parts, np.dtype(latent_dtype))
    meta.update(settings)
    if null_text is not None:
      records.write_null_text(directory, *null_text)
    files.write_json(os.path.join(directory, records.METADATA), meta, indent=1)
    return meta

  if count == 1:
    source = make_source()
    with files.atomic_directory(out) as tmp:  # --out appears whole, replacing a previous output, or not at all
      meta = finish(tmp, source, [encode_share(source, tmp)])
  else:
    staging = out + ".partial"
    identity = hashlib.sha256(json.dumps([count, batch_size, shard_size, latent_dtype, split, data_dir, settings],
                                         sort_keys=True, default=str).encode()).hexdigest()[:16]
    token = _begin(staging, index, count, identity, wait_timeout)
    try:
      source = make_source()
      part = encode_share(source, staging, process=index)
      if index:
        files.write_json(os.path.join(staging, DONE.format(index)), {"token": token, **part})
        log.warning("%s: process %d of %d wrote its share (%d examples); process 0 publishes %s", staging, index,
                    count, sum(b["count"] for b in part["buckets"]), out)
        return {**part, "count": sum(b["count"] for b in part["buckets"])}
      parts = [part] + _wait_for_processes(staging, token, count, wait_timeout, out)
      with files.atomic_directory(out) as tmp:
        for name in (f["path"] for p in parts for b in p["buckets"] for f in b["files"]):
          os.rename(files.inside(staging, name, "shard"), os.path.join(tmp, name))
        meta = finish(tmp, source, parts)
      shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
      if index == 0:  # nothing of the run survives: the others' shards go with the staging directory
        shutil.rmtree(staging, ignore_errors=True)
      else:
        for path in glob.glob(os.path.join(glob.escape(staging), f"latents-*-p{index:05d}-*.array_record")):
          with contextlib.suppress(OSError):
            os.remove(path)
      raise
  log.warning("%s: %d examples written, %d skipped", out, meta["count"], meta["skipped"])
  return meta


def _share(bucket_ids, num_buckets, batch_size, index, count):
  """`bucket_ids` with -1 outside process `index`'s share: run `index` of `count` contiguous runs of each
  bucket's batches, cut as one process cuts them (`batch_size` examples in index order)."""
  if count == 1:
    return bucket_ids
  ids = np.full_like(bucket_ids, -1)
  for b in range(num_buckets):
    members = np.nonzero(bucket_ids == b)[0]
    mine = np.array_split(np.arange(-(-len(members) // batch_size)), count)[index]
    if len(mine):
      ids[members[mine[0] * batch_size:(mine[-1] + 1) * batch_size]] = b
  return ids


def _marker(path, what):
  return files.read_json(path, what) if os.path.exists(path) else None


def _begin(staging, index, count, identity, timeout):
  """The run's token: process 0 starts a fresh staging directory (a failed run's leftovers removed) and
  writes it there; the others wait for it. Markers carry it, so a stale marker is never taken."""
  path = os.path.join(staging, RUN)
  if index == 0:
    if os.path.isdir(staging) and os.listdir(staging) and not os.path.exists(path):
      raise SanaError(f"{staging} exists and is not a precompute staging directory; move it away")
    shutil.rmtree(staging, ignore_errors=True)
    try:
      os.makedirs(staging)
    except OSError as e:
      raise SanaError(f"cannot create {staging}: {e.strerror}") from None
    token = secrets.token_hex(8)
    files.write_json(path, {"token": token, "process_count": count, "identity": identity})
    return token
  run = _poll(lambda: _marker(path, "precompute run file"), timeout)
  if run is None:
    raise SanaError(f"process {index}: process 0 did not start the run in {staging} within {timeout:g} s")
  if run.get("process_count") != count or run.get("identity") != identity:
    raise SanaError(f"process {index}: {staging} belongs to a run with other flags (process count, images, buckets "
                    "or encoding settings differ); start every process with the same flags")
  return run["token"]


def _poll(ready, timeout):
  """ready()'s first value other than None, polled until `timeout` seconds pass (then None)."""
  deadline = time.monotonic() + timeout
  while True:
    found = ready()
    if found is not None or time.monotonic() > deadline:
      return found
    time.sleep(min(1.0, max(timeout / 50, 0.02)))


def _wait_for_processes(staging, token, count, timeout, out):
  """The parts of processes 1 ... count-1, from their markers of this run."""
  parts = {}

  def ready():
    for p in range(1, count):
      if p not in parts:
        found = _marker(os.path.join(staging, DONE.format(p)), "precompute marker")
        if found is not None and found.get("token") == token:
          parts[p] = found
    return True if len(parts) == count - 1 else None

  if _poll(ready, timeout) is None:
    missing = [p for p in range(1, count) if p not in parts]
    raise SanaError(f"process(es) {missing} of {count} did not finish within {timeout:g} s of process 0; "
                    f"nothing written to {out}")
  return [parts[p] for p in range(1, count)]


def _write(source, share, batch_size, seed, control, directory, encode_images, encode_captions, scale, all_captions,
           latent_dtype, shard_size, read_threads, process):
  """Encodes the examples with bucket ids `share` (>= 0) into shards; returns this share's part of the
  metadata (JSON, for a marker): buckets, shapes, skipped and its first 100 [index, key], and the
  [h, w, row in this share's part of the bucket] of each DreamBooth class image."""
  writer = records.ShardWriter(directory, shard_size, process)
  seen, bad, shapes = set(), [], {}
  class_mask = getattr(source, "class_mask", None)
  written, class_rows = {}, []  # records per bucket so far; [h, w, row in it] of each class image
  if (share >= 0).any():
    plans = Plans(share, len(source.buckets), batch_size, seed, shuffle=False, drop_remainder=False)
    batches = loader.GlobalBatches(source, plans, epochs=1, refill=False,
                                   collate=functools.partial(_keep_all, control=control), with_index=True)
    it = loader.iterate(batches, read_threads=read_threads, prefetch=2)
    n = len(batches)
  else:  # a process with nothing to do (fewer examples than processes)
    it, n = None, 0
  start, done = time.time(), 0
  try:
    for _ in range(n):
      batch = next(it)
      if batch is None:  # every image of the batch was bad
        continue
      latents = np.asarray(encode_images(batch["images"]), np.float32) * scale
      control = np.asarray(encode_images(batch["control"]), np.float32) * scale if "control" in batch else None
      examples = batch["examples"]
      texts = [list(e["captions"]) if all_captions else [e["caption"]] for e in examples]
      y, mask = encode_captions([t for ts in texts for t in ts])
      y, mask = np.asarray(y, np.float32), np.asarray(mask)
      at = np.cumsum([0] + [len(ts) for ts in texts])
      for i, (e, index) in enumerate(zip(examples, batch["index"])):
        index = int(index)
        seen.add(index)
        if "bad" in e:
          log.warning("skipping %s: %s", e["key"], e["bad"])
          bad.append((index, e["key"]))
          continue
        yi, mi = y[at[i]:at[i + 1]], mask[at[i]:at[i + 1]]
        lat = latents[i].astype(latent_dtype)
        ctl = None if control is None else control[i].astype(latent_dtype)
        if not (np.isfinite(lat).all() and np.isfinite(yi.astype(latent_dtype)).all()
                and (ctl is None or np.isfinite(ctl).all())):
          bad.append((index, e["key"]))  # overflow in the stored precision: unusable for training
          continue
        scores = e["scores"] if all_captions else e["scores"][e["choice"]:e["choice"] + 1]
        size = tuple(int(d) for d in batch["images"].shape[1:3])
        if class_mask is not None and class_mask[index]:
          class_rows.append([*size, written.get(size, 0)])
        written[size] = written.get(size, 0) + 1
        writer.write(size, lat.shape, records.make_record(lat, yi, mi, captions=texts[i], scores=scores, key=e["key"],
                                                           size=size, latent_dtype=latent_dtype, control=ctl))
        shapes = dict(latent_channels=int(lat.shape[-1]), caption_length=int(y.shape[1]),
                      caption_channels=int(y.shape[2]))
      done += len(examples)
      log.info("%d images encoded (%.1f/s)", done, done / (time.time() - start))
  finally:
    buckets = writer.close()
    if it is not None:
      it.close()
  lost = [(int(i), source.describe(i)) for i in np.nonzero(share >= 0)[0] if int(i) not in seen]
  return dict(buckets=[{**b, "latent_shape": [int(d) for d in b["latent_shape"]]} for b in buckets], shapes=shapes,
              skipped=len(lost) + len(bad), skipped_examples=[list(x) for x in sorted(lost + bad)[:100]],
              class_rows=class_rows)


def _metadata(source, parts, latent_dtype):
  """The dataset's metadata from the processes' parts, in process order: each bucket's files are the
  parts' files in that order, so the global index runs over the examples as one process writes them."""
  shapes = [p["shapes"] for p in parts if p["shapes"]]
  if not shapes:
    raise SanaError("no image could be read and encoded; nothing written")
  if any(s != shapes[0] for s in shapes):
    raise SanaError(f"the processes' encoders disagree on the shapes: {shapes}")
  buckets, before = {}, []  # size -> merged bucket; per part: size -> records of the bucket in earlier parts
  for part in parts:
    before.append({})
    for b in part["buckets"]:
      size = tuple(b["size"])
      merged = buckets.setdefault(size, {"size": list(size), "latent_shape": b["latent_shape"], "count": 0,
                                         "files": []})
      if merged["latent_shape"] != b["latent_shape"]:
        raise SanaError(f"the processes' latents of bucket {size} differ in shape")
      before[-1][size] = merged["count"]
      merged["count"] += b["count"]
      merged["files"] += b["files"]
  ordered = [buckets[s] for s in sorted(buckets)]
  examples = list(getattr(source, "skipped_examples", [])) + [key for _, key in
                                                              sorted(x for p in parts for x in p["skipped_examples"])]
  meta = dict(format=records.FORMAT, version=records.VERSION, count=sum(b["count"] for b in ordered),
              skipped=source.scan_skipped + sum(p["skipped"] for p in parts), skipped_examples=examples[:100],
              latent_dtype=latent_dtype.name, buckets=ordered, **shapes[0])
  if getattr(source, "class_mask", None) is not None:  # global record indices: the buckets' files in order
    first = dict(zip(sorted(buckets), np.cumsum([0] + [b["count"] for b in ordered]).tolist()))
    meta["class_examples"] = sorted(first[(h, w)] + before[k][(h, w)] + row
                                    for k, p in enumerate(parts) for h, w, row in p["class_rows"])
  return meta


def encoder_parts(model, *, dtype, mesh=None, rules=None, max_sequence_length=300):
  """(DC-AE, PromptEncoder) of a diffusers-format Sana directory (its vae/, text_encoder/ and tokenizer/),
  with the directory's own prompt settings (the demo model: no CHI, short captions) as SanaPipeline reads
  them; `max_sequence_length` where it sets none."""
  from sana_jax.convert import diffusers_dcae, pipelines, transformers_gemma
  from sana_jax.text import PromptEncoder
  path = pipelines.resolve_model(model)
  vae = diffusers_dcae.load(pipelines.component_dir(path, "vae"), dtype=dtype, param_dtype=dtype, mesh=mesh,
                            rules=rules)
  settings = {k: v for k, v in pipelines.model_settings(path).items() if k in pipelines.TEXT_SETTINGS}
  settings.setdefault("max_sequence_length", max_sequence_length)
  text_encoder = transformers_gemma.load(pipelines.component_dir(path, "text_encoder"), dtype=dtype, param_dtype=dtype,
                                         mesh=mesh, rules=rules)
  return vae, PromptEncoder(pipelines.load_tokenizer(pipelines.component_dir(path, "tokenizer")), text_encoder,
                            **settings)


def load_encoders(model, *, dtype="float32", max_sequence_length=300, batch_size=16):
  """(encode_images, encode_captions, null_text, scaling_factor, spatial_compression) from a diffusers-format
  Sana directory (its vae/, text_encoder/ and tokenizer/), loaded as SanaPipeline loads them.
  Inputs are padded to `batch_size` rows so each bucket compiles once."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sana_jax import dtypes
  dtype = dtypes.resolve(dtype)
  vae, prompts = encoder_parts(model, dtype=dtype, max_sequence_length=max_sequence_length)
  graphdef, state = nnx.split(vae)
  encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))

  def encode_images(x):
    n = len(x)
    x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)]) if n < batch_size else x
    return np.asarray(encode(state, jnp.asarray(x, dtype)), np.float32)[:n]

  def encode_captions(texts):
    ys, masks = [], []
    for i in range(0, len(texts), batch_size):
      chunk = texts[i:i + batch_size]
      y, mask = prompts.encode_positive(chunk + [""] * (batch_size - len(chunk)))
      ys.append(np.asarray(y, np.float32)[:len(chunk)])
      masks.append(np.asarray(mask)[:len(chunk)])
    return np.concatenate(ys), np.concatenate(masks)

  y, mask = prompts.encode_negative([""])  # the reference's null caption: no CHI, no token selection
  null_text = (np.asarray(y, np.float32)[0], np.asarray(mask)[0])
  return encode_images, encode_captions, null_text, vae.scaling_factor, vae.config.spatial_compression


def parse_args(argv):
  p = ArgumentParser(prog="python -m sana_jax.data.precompute", description=__doc__.split("\n\n")[0])
  p.add_argument("--images", required=True,
                 help="image folder with caption sidecars, packed:DIR (python -m sana_jax.data.pack), or tfds:NAME")
  p.add_argument("--model", required=True, help="diffusers-format Sana directory (vae/, text_encoder/, tokenizer/)")
  p.add_argument("--out", required=True, help="output directory (new, or a previous output with --overwrite)")
  p.add_argument("--resolution", type=int, default=512, help="aspect-ratio buckets of this resolution (512 ... 4096)")
  p.add_argument("--square", action="store_true", help="one square bucket of --resolution pixels instead")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--data-dir", default=None, help="TFDS data_dir for --images tfds:NAME")
  p.add_argument("--split", default="train")
  p.add_argument("--all-captions", action="store_true", help="encode every caption (training draws one per epoch)")
  p.add_argument("--tau", type=float, default=0.1, help="caption choice weight score^(1/tau)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-sequence-length", type=int, default=300)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model compute dtype")
  p.add_argument("--latent-dtype", default="float16", choices=("float16", "float32"),
                 help="stored precision of the latents and text embeddings")
  p.add_argument("--shard-size", type=int, default=1024, help="records per ArrayRecord file")
  p.add_argument("--threads", type=int, default=4, help="threads decoding and resizing images")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--instance-prompt", default=None, help="DreamBooth: the caption of every --images image")
  p.add_argument("--class-images", default=None, help="DreamBooth prior preservation: a folder of class images")
  p.add_argument("--class-prompt", default=None, help="the caption of every --class-images image")
  condition = p.add_mutually_exclusive_group()
  condition.add_argument("--control", choices=("edge",), default=None,
                         help="ControlNet: also encode each image's edge map (sana_jax.controls.edge_map)")
  condition.add_argument("--control-images", default=None, metavar="DIR",
                         help="ControlNet: also encode the condition image of the same name in DIR")
  hosts = p.add_argument_group("several processes (hosts) sharing the work, on a filesystem they share")
  hosts.add_argument("--process-index", type=int, default=None, help="this process's index (with --process-count)")
  hosts.add_argument("--process-count", type=int, default=None, help="the number of processes")
  hosts.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() (it detects Cloud TPU, SLURM, ... clusters) and take the "
                          "process index and count from it")
  hosts.add_argument("--wait-timeout", type=float, default=3600.0,
                     help="seconds process 0 waits for the others once its share is done (default %(default)s)")
  args = p.parse_args(argv)
  args.control = f"images:{args.control_images}" if args.control_images is not None else args.control
  return args


def run(args):
  buckets = [(args.resolution, args.resolution)] if args.square else args.resolution
  bucket_table(buckets, 1, 32)  # fail on a bad resolution, DreamBooth or control flag before loading any model
  check_dreambooth(args.images, args.instance_prompt, args.class_images, args.class_prompt)
  check_control(args.images, args.control, args.class_images)
  if args.distributed:
    import jax
    try:
      jax.distributed.initialize()
    except Exception as e:  # noqa: BLE001 - no cluster detected, coordinator unreachable: the user's to fix
      raise SanaError(f"--distributed: jax.distributed.initialize() failed: {e}") from None
  processes(args.process_index, args.process_count)
  encode_images, encode_captions, null, scale, f = load_encoders(
      args.model, dtype=args.dtype, batch_size=args.batch_size, max_sequence_length=args.max_sequence_length)
  return precompute(args.images, args.out, encode_images=encode_images, encode_captions=encode_captions,
                    null_text=null, scaling_factor=scale, buckets=buckets, spatial_compression=f,
                    batch_size=args.batch_size,
                    data_dir=args.data_dir, split=args.split, all_captions=args.all_captions, tau=args.tau,
                    seed=args.seed, latent_dtype=args.latent_dtype, shard_size=args.shard_size,
                    overwrite=args.overwrite, read_threads=args.threads, extra_metadata={"model": args.model},
                    instance_prompt=args.instance_prompt, class_images=args.class_images,
                    class_prompt=args.class_prompt, control=args.control, process_index=args.process_index,
                    process_count=args.process_count, wait_timeout=args.wait_timeout)


@cli_main
def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("sana_jax.data").setLevel(logging.INFO)
  meta = run(parse_args(sys.argv[1:] if argv is None else argv))
  keys = ("count", "skipped", "latent_channels", "caption_length", "caption_channels")
  print(json.dumps({k: meta.get(k, meta.get("shapes", {}).get(k)) for k in keys}))  # another process: its share
  return 0


if __name__ == "__main__":
  sys.exit(main())
