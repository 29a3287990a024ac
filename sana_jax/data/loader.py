"""The grain pipeline: plan -> this process's rows -> load (skip and refill bad examples) -> collate.

`GlobalBatches` is a grain MapDataset whose element s is this process's slice of global batch s, so
an iterator's state is one step counter and restoring it continues with exactly the next batch.

Bad examples (a corrupt image or record, an unreadable sidecar): training refills the row from
the same row of the bucket's following batches in the epoch's order (`Plan.spares`), a choice
that every process makes alike, so a batch keeps its size, its bucket and its independence of the
process count; each bad example is counted. Precompute drops bad rows instead.
"""
import logging
import sys

import grain
import numpy as np

from sana_jax.errors import SanaError

log = logging.getLogger(__name__)
_LOGGED_SKIPS = 20  # per process; later skips are only counted


def collate_latents(examples, caption_length):
  """{"latents" f32 [b, h, w, c], "y" f32 [b, L, Dy], "mask" i32 [b, L]}, zero-padded to L tokens, and
  "control" f32 [b, h, w, c] when the examples have it."""
  b, dy = len(examples), examples[0]["y"].shape[-1]
  y, mask = np.zeros((b, caption_length, dy), np.float32), np.zeros((b, caption_length), np.int32)
  for i, e in enumerate(examples):
    n = len(e["mask"])
    y[i, :n], mask[i, :n] = e["y"], e["mask"]
  out = {"latents": np.stack([e["latents"] for e in examples]).astype(np.float32), "y": y, "mask": mask}
  if "control" in examples[0]:
    out["control"] = np.stack([e["control"] for e in examples]).astype(np.float32)
  return out


def collate_images(examples, caption_length=None):
  """{"images" f32 [b, H, W, 3] in [-1, 1], "captions" object [b] (this epoch's caption each)}."""
  del caption_length
  return {"images": np.stack([e["image"] for e in examples]),
          "captions": np.array([e["caption"] for e in examples], dtype=object)}


class GlobalBatches(grain.MapDataset):
  """Element s: (this process's rows of global batch s, collated; number of bad examples met)."""

  def __init__(self, source, plans, *, process_index=0, process_count=1, epochs=None, refill=True,
               max_refill=16, collate, caption_length=None, with_index=False):
    super().__init__()
    if plans.global_batch % process_count or not 0 <= process_index < process_count:
      raise SanaError(f"global batch {plans.global_batch} does not split over {process_count} processes "
                      f"(process {process_index})")
    self.source, self.plans = source, plans
    self._index, self._count = process_index, process_count
    self._len = sys.maxsize if epochs is None else epochs * plans.batches_per_epoch
    self._refill, self._max_refill, self._with_index = refill, max_refill, with_index
    self._collate, self._caption_length = collate, caption_length
    self._logged = 0

  def __len__(self):
    return self._len

  def __str__(self):
    return f"GlobalBatches(global_batch={self.plans.global_batch}, process={self._index}/{self._count})"

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    batch = self.plans.batch(step)
    b = -(-len(batch.rows) // self._count)
    examples, indices, skipped = [], [], 0
    for row in range(self._index * b, min((self._index + 1) * b, len(batch.rows))):
      index = int(batch.rows[row])
      for attempt in range(self._max_refill + 1):
        try:
          examples.append(self.source.load(index, batch.epoch))
          indices.append(index)
          break
        except Exception as e:  # noqa: BLE001 - whatever the data is, a bad example must not stop training
          skipped += 1
          self._log_skip(index, e)
          if not self._refill:
            break
          if attempt == self._max_refill:
            raise SanaError(f"{attempt + 1} bad examples in a row in bucket {batch.bucket} "
                            f"(last: {self.source.describe(index)}: {e})") from e
          index = batch.spares(row, attempt)
    if not examples:
      return None, skipped
    out = self._collate(examples, self._caption_length)
    if self._with_index:
      out["index"] = np.asarray(indices, np.int32)
    return out, skipped

  def _log_skip(self, index, error):
    if self._logged < _LOGGED_SKIPS:
      self._logged += 1
      log.warning("skipping bad example %s: %s: %s%s", self.source.describe(index), type(error).__name__, error,
                  " (further skips are only counted)" if self._logged == _LOGGED_SKIPS else "")


class TrainIterator(grain.DatasetIterator):
  """Yields batches. Its state is {"plan", "step", "skipped"}: global batch s is a pure function of s,
  so a restored iterator restarts the grain pipeline at the saved step, and the state carries over to
  any number of processes or workers. `skipped` counts bad examples this process met so far."""

  def __init__(self, batches, *, read_threads, prefetch, num_workers=0, worker_buffer_size=2, scan_skipped=0):
    super().__init__()
    self._batches, self.kind, self.scan_skipped = batches, batches.source.kind, scan_skipped
    self._options = (max(read_threads, 1), prefetch, num_workers, worker_buffer_size)
    self.fingerprint = batches.plans.fingerprint()
    self.step, self.skipped, self._it = 0, 0, None

  def _start(self):
    """The grain pipeline from `step` on: threads (and optionally worker processes) build batches
    ahead; order and content do not depend on either. Started lazily, so set_state costs nothing."""
    if self._it is None:
      threads, prefetch, workers, buffer = self._options
      ds = self._batches[self.step:] if self.step else self._batches
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
      if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; scripts without absl.app use defaults
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
      self._it = iter(ds)
    return self._it

  def __next__(self):
    batch, skipped = next(self._start())
    self.step += 1
    self.skipped += skipped
    return batch

  def get_state(self):
    return {"plan": self.fingerprint, "step": self.step, "skipped": self.skipped}

  def set_state(self, state):
    if state.get("plan") != self.fingerprint:
      raise SanaError("the saved data iterator state belongs to another data pipeline (source, seed or global "
                      "batch changed); start the data afresh or restore with the original data config")
    self.close()
    self.step, self.skipped = int(state["step"]), int(state["skipped"])

  def start_prefetch(self):
    self._start().start_prefetch()

  def close(self):
    if self._it is not None:
      self._it.close()
      self._it = None


def iterate(batches, **options):
  """A TrainIterator over a GlobalBatches dataset (options: see TrainIterator)."""
  return TrainIterator(batches, **options)
