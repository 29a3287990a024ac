"""Encode an image dataset once: DC-AE latents (times the scaling factor) and text embeddings, written
as ArrayRecord shards + metadata that `source="array_record:OUT"` trains from (format: `records`).

  python -m sana_jax.data.precompute --images DIR_OR_tfds:NAME --model DIFFUSERS_DIR --out DIR \
      [--resolution 512] [--batch-size 16] [--all-captions]
      [--instance-prompt TEXT] [--class-images DIR --class-prompt TEXT]   # DreamBooth
      [--control edge | --control-images DIR]                             # ControlNet

Images go through the training transform (nearest aspect bucket of `--resolution`, resize-cover,
centre crop), in order, bucket by bucket. Unreadable images are skipped and counted; the output
appears only when complete (written to OUT.partial, then renamed).

DreamBooth: --instance-prompt is the caption of every --images folder image (sidecars ignored);
--class-images are written into the same records with --class-prompt, and the metadata lists them
(`class_examples`), so training with data.repeats repeats only the instance images (see
`sources.DreamBoothSource` for the prior-preservation semantics).

ControlNet: each record also holds the latents of its condition image (`control`, encoded as the
image is), made with --control edge from the transformed image (`controls.edge_map`) or read with
--control-images from a folder of condition images named as the --images folder's images and
transformed as they are; an example whose condition image cannot be read is skipped.
"""
import functools
import json
import logging
import os
import sys
import time

import numpy as np

from sana_jax import controls, files
from sana_jax.data import images as images_lib
from sana_jax.data import loader, records
from sana_jax.data.buckets import bucket_table
from sana_jax.data.config import check_prompt
from sana_jax.data.plan import Plans
from sana_jax.data.sources import FolderSource, TfdsImageSource, dreambooth
from sana_jax.errors import ArgumentParser, SanaError, cli_main, short

log = logging.getLogger(__name__)


def image_source(images, *, data_dir=None, split="train", table, seed=0, tau=0.1, prompt=None):
  """`tfds:NAME` -> a TFDS image dataset; a directory -> an image folder with caption sidecars (or all
  captioned `prompt`)."""
  if images.startswith("tfds:"):
    if prompt is not None:
      raise SanaError("--instance-prompt needs an image folder for --images, not tfds:NAME")
    return TfdsImageSource(images[5:], data_dir=data_dir, split=split, table=table, seed=seed, tau=tau)
  if os.path.isdir(images):
    return FolderSource(images, table=table, seed=seed, tau=tau, prompt=prompt)
  raise SanaError(f"--images {images!r}: neither a directory nor tfds:NAME")


def check_dreambooth(images, instance_prompt=None, class_images=None, class_prompt=None):
  """One-line errors for DreamBooth flags that do not fit together, before any model loads."""
  folder = not str(images).startswith("tfds:")
  if instance_prompt is not None:
    check_prompt("--instance-prompt", instance_prompt)
    if not folder:
      raise SanaError("--instance-prompt needs an image folder for --images, not tfds:NAME")
  if (class_images is None) != (class_prompt is None):
    raise SanaError("--class-images and --class-prompt go together")
  if class_images is not None:
    check_prompt("--class-prompt", class_prompt)
    if not folder:
      raise SanaError("--class-images needs an image folder for --images, not tfds:NAME")
    if not os.path.isdir(os.path.expanduser(class_images)):
      raise SanaError(f"--class-images {class_images!r} is not a directory")


def check_control(images, control, class_images=None):
  """One-line errors for a `control` (None, "edge" or "images:DIR") that does not fit, before any model loads."""
  if control is None or control == "edge":
    return
  folder = control[len("images:"):] if isinstance(control, str) and control.startswith("images:") else ""
  if not folder:
    raise SanaError(f"control {short(control)}: expected 'edge' or 'images:DIR'")
  if str(images).startswith("tfds:"):
    raise SanaError("--control-images needs an image folder for --images, not tfds:NAME")
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


def precompute(images, out, *, encode_images, encode_captions, scaling_factor, buckets, null_text=None,
               spatial_compression=32, batch_size=16, data_dir=None, split="train", all_captions=False, tau=0.1, seed=0,
               latent_dtype="float16", shard_size=1024, overwrite=False, read_threads=2, extra_metadata=None,
               instance_prompt=None, class_images=None, class_prompt=None, control=None):
  """Writes the dataset to `out`; returns its metadata.

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
  """
  check_dreambooth(images, instance_prompt, class_images, class_prompt)
  check_control(images, control, class_images)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise SanaError(f"--out {out} exists and is not empty (pass --overwrite to replace a previous output)")
    if records.read_metadata(out) is None:
      raise SanaError(f"--out {out} is not a precompute output; refusing to overwrite it")
  if batch_size <= 0 or shard_size <= 0:
    raise SanaError(f"batch size {batch_size} and shard size {shard_size} must be positive")
  table = bucket_table(buckets, 1, spatial_compression)
  source = image_source(images, data_dir=data_dir, split=split, table=table, seed=seed, tau=tau, prompt=instance_prompt)
  if class_images is not None:
    source = dreambooth(source, classes=FolderSource(os.path.expanduser(class_images), table=table, seed=seed, tau=tau,
                                                     prompt=class_prompt))
  given = dict(instance_prompt=instance_prompt, class_images=class_images, class_prompt=class_prompt, control=control)
  plans = Plans(source.bucket_ids, len(table), batch_size, seed, shuffle=False, drop_remainder=False)
  collate = functools.partial(_keep_all, control=control)
  batches = loader.GlobalBatches(source, plans, epochs=1, refill=False, collate=collate, with_index=True)
  with files.atomic_directory(out) as tmp:  # --out appears whole, replacing a previous output, or not at all
    meta = _write(batches, source, tmp, encode_images, encode_captions, scaling_factor, all_captions,
                  np.dtype(latent_dtype), shard_size, read_threads)
    meta.update(source=images, resolution_buckets=[[h, w] for _, h, w in table], scaling_factor=float(scaling_factor),
                spatial_compression=spatial_compression, captions="all" if all_captions else "one", tau=tau,
                seed=seed, **{k: v for k, v in given.items() if v is not None}, **(extra_metadata or {}))
    if null_text is not None:
      records.write_null_text(tmp, *null_text)
    files.write_json(os.path.join(tmp, records.METADATA), meta, indent=1)
  log.warning("%s: %d examples written, %d skipped", out, meta["count"], meta["skipped"])
  return meta


def _write(batches, source, directory, encode_images, encode_captions, scale, all_captions, latent_dtype,
           shard_size, read_threads):
  writer = records.ShardWriter(directory, shard_size)
  seen, bad_keys, shapes = set(), [], {}
  class_mask = getattr(source, "class_mask", None)
  written, class_rows = {}, []  # records per bucket so far; (bucket, row in it) of each class image
  it = loader.iterate(batches, read_threads=read_threads, prefetch=2)
  start, done = time.time(), 0
  try:
    for _ in range(len(batches)):
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
        seen.add(int(index))
        if "bad" in e:
          log.warning("skipping %s: %s", e["key"], e["bad"])
          bad_keys.append(e["key"])
          continue
        yi, mi = y[at[i]:at[i + 1]], mask[at[i]:at[i + 1]]
        lat = latents[i].astype(latent_dtype)
        ctl = None if control is None else control[i].astype(latent_dtype)
        if not (np.isfinite(lat).all() and np.isfinite(yi.astype(latent_dtype)).all()
                and (ctl is None or np.isfinite(ctl).all())):
          bad_keys.append(e["key"])  # overflow in the stored precision: unusable for training
          continue
        scores = e["scores"] if all_captions else e["scores"][e["choice"]:e["choice"] + 1]
        size = tuple(batch["images"].shape[1:3])
        if class_mask is not None and class_mask[index]:
          class_rows.append((size, written.get(size, 0)))
        written[size] = written.get(size, 0) + 1
        writer.write(size, lat.shape, records.make_record(lat, yi, mi, captions=texts[i], scores=scores, key=e["key"],
                                                           size=size, latent_dtype=latent_dtype, control=ctl))
        shapes = dict(latent_channels=lat.shape[-1], caption_length=y.shape[1], caption_channels=y.shape[2])
      done += len(examples)
      log.info("%d images encoded (%.1f/s)", done, done / (time.time() - start))
  finally:
    buckets = writer.close()
    it.close()
  if not shapes:
    raise SanaError("no image could be read and encoded; nothing written")
  lost = [source.describe(i) for i in np.nonzero(source.bucket_ids >= 0)[0] if int(i) not in seen]
  skipped = list(getattr(source, "skipped_examples", [])) + lost + bad_keys
  meta = dict(format=records.FORMAT, version=records.VERSION, count=sum(b["count"] for b in buckets),
              skipped=source.scan_skipped + len(lost) + len(bad_keys), skipped_examples=skipped[:100],
              latent_dtype=latent_dtype.name, buckets=buckets, **shapes)
  if class_mask is not None:  # global record indices: the buckets' files in the metadata's order
    first = dict(zip((tuple(b["size"]) for b in buckets), np.cumsum([0] + [b["count"] for b in buckets]).tolist()))
    meta["class_examples"] = sorted(first[size] + row for size, row in class_rows)
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
  p.add_argument("--images", required=True, help="image folder with caption sidecars, or tfds:NAME")
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
  args = p.parse_args(argv)
  args.control = f"images:{args.control_images}" if args.control_images is not None else args.control
  return args


def run(args):
  buckets = [(args.resolution, args.resolution)] if args.square else args.resolution
  bucket_table(buckets, 1, 32)  # fail on a bad resolution, DreamBooth or control flag before loading any model
  check_dreambooth(args.images, args.instance_prompt, args.class_images, args.class_prompt)
  check_control(args.images, args.control, args.class_images)
  encode_images, encode_captions, null, scale, f = load_encoders(
      args.model, dtype=args.dtype, batch_size=args.batch_size, max_sequence_length=args.max_sequence_length)
  return precompute(args.images, args.out, encode_images=encode_images, encode_captions=encode_captions,
                    null_text=null, scaling_factor=scale, buckets=buckets, spatial_compression=f,
                    batch_size=args.batch_size,
                    data_dir=args.data_dir, split=args.split, all_captions=args.all_captions, tau=args.tau,
                    seed=args.seed, latent_dtype=args.latent_dtype, shard_size=args.shard_size,
                    overwrite=args.overwrite, read_threads=args.threads, extra_metadata={"model": args.model},
                    instance_prompt=args.instance_prompt, class_images=args.class_images,
                    class_prompt=args.class_prompt, control=args.control)


@cli_main
def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("sana_jax.data").setLevel(logging.INFO)
  meta = run(parse_args(sys.argv[1:] if argv is None else argv))
  print(json.dumps({k: meta[k] for k in ("count", "skipped", "latent_channels", "caption_length", "caption_channels")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
