"""The data config (`cfg.data`): keys, defaults and their meaning. Unknown keys are errors."""
import types

import ml_collections as mlc

from sana_jax.errors import SanaError

DEFAULTS = dict(
    # "synthetic" | "array_record:DIR_OR_GLOB" (precomputed latents) | "tfds:NAME" (TFDS image dataset,
    # e.g. "sana_image_folder/NAME") | "folder:DIR" (images + caption sidecars, read directly)
    source="synthetic",
    batch_size=None,          # global batch; make_train_iterator uses it when global_batch is not given
    data_dir=None,            # TFDS data_dir (None: TFDS's default)
    latent_channels=32,       # DC-AE latent channels; checked against precomputed records
    latent_size=32,           # side of the square bucket in latents when buckets is None
    spatial_compression=32,   # pixels per latent (DC-AE f32)
    caption_length=300,       # L: y and mask are padded to this many tokens
    caption_channels=2304,    # Dy: text-encoder width (Gemma-2 2B); checked against records
    buckets=None,             # None: one square bucket; an int resolution: aspect_ratio.bins(res);
                              # a list of (height, width) in pixels. Precomputed latents keep their own.
    shuffle=True,             # False: examples in order (still grouped by bucket)
    caption_tau=0.1,          # caption choice weight score^(1/tau); 0 -> always the best-scored
    synthetic_size=65536,     # examples per synthetic epoch
    num_workers=0,            # grain worker processes (0: in-process, as the tests run)
    worker_buffer_size=2,     # batches each worker prepares ahead
    read_threads=2,           # threads building batches in each process (or worker)
    prefetch=4,               # batches buffered ahead by those threads
    max_refill=16,            # a bad example is replaced by up to this many candidates, then error
    with_index=False,         # add "index" int32 [b]: the example ids in the batch
)


def default_config():
  return mlc.ConfigDict(DEFAULTS)


def resolve(cfg):
  """Defaults overlaid with `cfg` (a ConfigDict, dict or None) as an attribute namespace."""
  given = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise SanaError(f"unknown data config key(s) {unknown}; known: {sorted(DEFAULTS)}")
  c = types.SimpleNamespace(**{**DEFAULTS, **given})
  for name in ("num_workers", "read_threads", "prefetch", "max_refill"):
    if getattr(c, name) < 0:
      raise SanaError(f"data.{name} must be non-negative, got {getattr(c, name)}")
  return c
