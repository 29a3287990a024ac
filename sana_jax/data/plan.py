"""Global-batch plans: which examples make up global batch s.

Per epoch: permute the examples by a hash of (seed, epoch), group them by bucket (keeping that
order), cut each bucket into global batches, drop each bucket's remainder, and permute the batches.
Every process computes the same plan, so a global batch's content depends only on (seed, data,
global batch size), never on the number of processes or workers; process p takes rows
[p * b, (p + 1) * b). The number of batches per epoch is fixed, so step s is batch s % n of
epoch s // n and iteration is an index lookup: exact to resume, endless.
"""
import dataclasses
import threading

import numpy as np

from sana_jax.data import hashing
from sana_jax.errors import SanaError


@dataclasses.dataclass(frozen=True)
class Batch:
  epoch: int
  bucket: int
  rows: np.ndarray     # example indices of the whole global batch
  spares: callable     # spares(row, t): the t-th replacement candidate for a bad example in `row`


class Plans:
  """Batch lookup by step over endless epochs (or one epoch, in order, remainders kept)."""

  def __init__(self, bucket_ids, num_buckets, global_batch, seed, *, shuffle=True, drop_remainder=True):
    self.bucket_ids = np.asarray(bucket_ids, np.int64)
    self.counts = np.bincount(self.bucket_ids[self.bucket_ids >= 0], minlength=num_buckets)
    self.global_batch, self.seed, self.shuffle, self.drop_remainder = global_batch, seed, shuffle, drop_remainder
    g = global_batch
    per_bucket = self.counts // g if drop_remainder else -(-self.counts // g)
    self.batches_per_epoch = int(per_bucket.sum())
    if self.batches_per_epoch == 0:
      raise SanaError(f"no global batch of {g} can be formed: examples per bucket {self.counts.tolist()}")
    # (bucket, start within the bucket) of each batch, before the per-epoch batch permutation
    self._bucket = np.repeat(np.arange(num_buckets), per_bucket)
    self._start = np.concatenate([np.arange(n) * g for n in per_bucket]).astype(np.int64)
    self._offsets = np.concatenate([[0], np.cumsum(self.counts)])
    self._cache, self._lock = {}, threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _epoch(self, epoch):
    """(examples grouped by bucket in this epoch's order, batch permutation), cached for two epochs."""
    with self._lock:
      if epoch not in self._cache:
        n = len(self.bucket_ids)
        if self.shuffle:
          order = np.argsort(hashing.hash64_array(self.seed, epoch, hashing.SHUFFLE, np.arange(n)), kind="stable")
          batch_order = np.argsort(hashing.hash64_array(self.seed, epoch, hashing.BATCH_ORDER,
                                                        np.arange(self.batches_per_epoch)), kind="stable")
        else:
          order, batch_order = np.arange(n), np.arange(self.batches_per_epoch)
        order = order[self.bucket_ids[order] >= 0]
        grouped = order[np.argsort(self.bucket_ids[order], kind="stable")]
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = (grouped, batch_order)
      return self._cache[epoch]

  def batch(self, step):
    epoch, k = divmod(step, self.batches_per_epoch)
    grouped, batch_order = self._epoch(epoch)
    j = batch_order[k]
    b, start = int(self._bucket[j]), int(self._start[j])
    first, count = self._offsets[b], self.counts[b]
    rows = grouped[first + start:first + min(start + self.global_batch, count)]

    def spares(row, t):  # the same row of the following batches of this bucket, wrapping around
      return int(grouped[first + (start + (t + 1) * self.global_batch + row) % count])

    return Batch(epoch, b, rows, spares)

  def fingerprint(self):
    """Identifies the plan (not the process layout): a saved iterator state must match it."""
    ids = np.bitwise_xor.reduce(hashing.hash64_array(np.arange(len(self.bucket_ids)), self.bucket_ids))
    return f"{hashing.hash64(len(self.bucket_ids), int(ids), self.global_batch, self.seed, self.shuffle):016x}"
