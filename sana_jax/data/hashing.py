"""Counter-based randomness: every random choice in the input pipeline is a pure function of
(seed, epoch, purpose, index). Any process, worker or resumed run recomputes the same value without
carrying generator state, and the result does not depend on numpy's generator versions."""
import numpy as np

_MASK = (1 << 64) - 1
# purposes, mixed into the hash so that different uses of one (seed, index) are independent
SHUFFLE, BATCH_ORDER, CAPTION, SYNTH_BUCKET, SYNTH_LATENTS, SYNTH_Y, SYNTH_LENGTH = range(1, 8)


def _splitmix(x):
  x = (x + 0x9E3779B97F4A7C15) & _MASK
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
  return x ^ (x >> 31)


def _splitmix_np(x):
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hash64(*keys):
  """A 64-bit hash of a sequence of integers (a Python int)."""
  h = 0
  for k in keys:
    h = _splitmix(h ^ (int(k) & _MASK))
  return h


def hash64_array(*keys):
  """hash64 elementwise over integer arrays (broadcast); equal to hash64 on each element."""
  h = np.zeros((), np.uint64)
  with np.errstate(over="ignore"):
    for k in keys:
      h = _splitmix_np(h ^ np.asarray(k).astype(np.int64).astype(np.uint64))
  return h


def uniform(*keys):
  """A float in [0, 1) from the hash of the keys."""
  return (hash64(*keys) >> 11) * 2.0**-53
