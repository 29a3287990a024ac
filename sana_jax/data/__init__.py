"""Training data: grain pipelines over synthetic, precomputed (ArrayRecord) and image sources.

    it = data.make_train_iterator(cfg.data, global_batch=256, process_index=jax.process_index(),
                                  process_count=jax.process_count(), seed=cfg.seed)
    batch = next(it)  # {"latents" f32 [b, h, w, c], "y" f32 [b, L, Dy], "mask" i32 [b, L]}, b = 256 / processes
    state = it.get_state()  # JSON-able dict; it.set_state(state) resumes with exactly the next batch
    data.skipped_count(it)  # bad examples this process has skipped (and refilled) so far

Checkpointing with orbax (grain's handler writes get_state() as process_{i}-of-{n}.json):

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

Image sources ("folder:DIR", "tfds:NAME", "packed:DIR") yield {"images" f32 [b, H, W, 3] in [-1, 1],
"captions" object [b]} instead (`it.kind == "images"`); `python -m sana_jax.data.precompute` turns them
into latents once, `python -m sana_jax.data.pack` a folder into the ArrayRecord shards of packed:DIR.
Config keys: `config.DEFAULTS`; record formats: `records`, `pack`; plans: `plan`.

DreamBooth (a few images of one subject, e.g. for LoRA): data.instance_prompt captions every image of a
folder: source, data.repeats shows each example that many times per epoch, and data.class_source with
data.class_prompt mixes in prior-preservation class images (`sources.DreamBoothSource`); precompute's
--instance-prompt, --class-images and --class-prompt put the same into records.

ControlNet: data.control adds "control" f32 [b, h, w, c], the condition images' latents, to each batch
(records precomputed with --control edge or --control-images DIR; synthetic data: sign(latents)).
"""
import logging
import numbers
import os

import numpy as np

from sana_jax.data import loader, records
from sana_jax.data.buckets import bucket_table
from sana_jax.data.config import DEFAULTS, IMAGE_SOURCES, default_config, resolve
from sana_jax.data.loader import GlobalBatches, TrainIterator, collate_images, collate_latents
from sana_jax.data.plan import Plans
from sana_jax.data.sources import make_source
from sana_jax.errors import SanaError

log = logging.getLogger(__name__)

__all__ = ["DEFAULTS", "GlobalBatches", "TrainIterator", "default_config", "make_source", "make_train_iterator",
           "null_text", "skipped_count"]


def make_train_iterator(cfg, *, global_batch=None, process_index=0, process_count=1, seed=0, split="train"):
  """An endless, deterministic, resumable iterator over this process's slices of global batches.

  All rows of a global batch share one bucket; global batch s is the same set of examples for any
  process_count (process p gets rows [p*b, (p+1)*b), b = global_batch // process_count); epoch e is
  shuffled with (seed, e); remainders are dropped. `split`: see `sources.make_source`. See
  `config.DEFAULTS` for the keys of `cfg`.
  """
  c = resolve(cfg)
  global_batch = c.batch_size if global_batch is None else global_batch
  if isinstance(global_batch, bool) or not isinstance(global_batch, numbers.Integral) or global_batch <= 0:
    raise SanaError(f"global batch {global_batch!r}: pass a positive global_batch= or set data.batch_size")
  global_batch = int(global_batch)
  table = bucket_table(c.buckets, c.latent_size, c.spatial_compression)
  source = make_source(c, seed=seed, split=split, table=table)
  plans = Plans(source.bucket_ids, len(source.buckets), global_batch, seed, shuffle=c.shuffle)
  collate = collate_latents if source.kind == "latents" else collate_images
  batches = GlobalBatches(source, plans, process_index=process_index, process_count=process_count,
                          max_refill=c.max_refill, collate=collate, caption_length=c.caption_length,
                          with_index=c.with_index)
  return loader.iterate(batches, read_threads=c.read_threads, prefetch=c.prefetch, num_workers=c.num_workers,
                          worker_buffer_size=c.worker_buffer_size, scan_skipped=source.scan_skipped)


def skipped_count(it):
  """Bad examples this process met (and replaced) since the start of the run, restored state included.
  Examples found unreadable before training started (headers, records without a bucket) are
  excluded from every plan and counted separately in `it.scan_skipped`. 0 for an iterator that
  does not count (a wrapper, a test double)."""
  return int(getattr(it, "skipped", 0))


def null_text(cfg, split="train"):
  """(y f32 [L, Dy], mask i32 [L]): the unconditional text embedding that caption dropout substitutes.

  Precomputed data: the empty caption's encoding that precompute stored beside the records. Synthetic
  data (and records without one, with a warning): zeros with only the first (BOS) token unmasked.
  """
  c = resolve(cfg)
  kind, _, arg = c.source.partition(":")
  if kind in IMAGE_SOURCES:
    raise SanaError(f"source {c.source!r} holds images: encode the empty caption with the text encoder "
                    "(PromptEncoder.encode_negative), or precompute the dataset")
  if kind == "array_record":
    directory = os.path.expanduser(arg)
    if os.path.isdir(os.path.join(directory, split)):
      directory = os.path.join(directory, split)
    found = records.read_null_text(directory, c.caption_length) if os.path.isdir(directory) else None
    if found is not None:
      if found[0].shape[-1] != c.caption_channels:
        raise SanaError(f"{directory}: null text of width {found[0].shape[-1]}, config caption_channels "
                        f"{c.caption_channels}")
      return found
    log.warning("%s has no %s: the null caption embedding is zeros", arg, records.NULL_TEXT)
  y = np.zeros((c.caption_length, c.caption_channels), np.float32)
  mask = np.zeros(c.caption_length, np.int32)
  mask[0] = 1
  return y, mask
