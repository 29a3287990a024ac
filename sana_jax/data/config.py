"""The data config (`cfg.data`): keys, defaults and their meaning. Unknown keys are errors."""
import numbers
import types

import ml_collections as mlc

from sana_jax.errors import SanaError, short

DEFAULTS = dict(
    # "synthetic" | "array_record:DIR_OR_GLOB" (precomputed latents) | "tfds:NAME" (TFDS image dataset,
    # e.g. "sana_image_folder/NAME") | "folder:DIR" (images + caption sidecars, read directly) |
    # "packed:DIR" (such a folder packed into ArrayRecord shards by `python -m sana_jax.data.pack`)
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
    with_index=False,         # add "index" int32 [b]: the example ids in the batch (with repeats or class_source:
                              # the ids of `sources.DreamBoothSource`)
    control=False,            # True: batches carry "control" f32 [b, h, w, c], condition latents for ControlNet
                              # training (array_record: precompute --control edge or --control-images DIR;
                              # synthetic: a function of the latents)
    # DreamBooth (as diffusers' train_dreambooth_lora_sana.py): a handful of images of one subject
    repeats=1,                # each (instance) example this many times per epoch, copies drawing captions apart
    instance_prompt=None,     # folder:DIR sources: THE caption of every image (sidecars ignored, none needed);
                              # precomputed records carry precompute's --instance-prompt instead
    class_source=None,        # "folder:DIR": prior-preservation class images, each once per epoch, in the same
                              # batches as the instance images (precompute: --class-images); see DreamBoothSource
    class_prompt=None,        # the caption of every class image; required with class_source
)
MAX_REPEATS = 10000
IMAGE_SOURCES = ("folder", "tfds", "packed")  # source kinds that yield images, not latents


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
  _check_dreambooth(c)
  _check_control(c)
  return c


def check_prompt(name, value):
  """A DreamBooth prompt: a non-empty string (an empty one would train the unconditional embedding)."""
  if not isinstance(value, str) or not value.strip():
    raise SanaError(f"{name} must be a non-empty string, got {short(value)}")
  return value


def _check_control(c):
  if not isinstance(c.control, bool):
    raise SanaError(f"data.control must be True or False, got {short(c.control)}")
  if c.control and str(c.source).partition(":")[0] in IMAGE_SOURCES:
    raise SanaError(f"data.control needs precomputed latents, not {short(c.source)}: precompute with --control edge "
                    "or --control-images DIR and train from array_record:OUT")


def _check_dreambooth(c):
  kind = str(c.source).partition(":")[0]
  if isinstance(c.repeats, bool) or not isinstance(c.repeats, numbers.Integral) or not 1 <= c.repeats <= MAX_REPEATS:
    raise SanaError(f"data.repeats must be an integer in [1, {MAX_REPEATS}], got {short(c.repeats)}")
  c.repeats = int(c.repeats)
  if c.instance_prompt is not None:
    check_prompt("data.instance_prompt", c.instance_prompt)
    if kind != "folder":
      raise SanaError(f"data.instance_prompt needs a folder:DIR source, not {short(c.source)} (precomputed records: "
                      "precompute with --instance-prompt)")
  if c.class_prompt is not None:
    check_prompt("data.class_prompt", c.class_prompt)
    if c.class_source is None:
      raise SanaError("data.class_prompt is set without data.class_source (the class images' folder:DIR)")
  if c.class_source is not None:
    if not (isinstance(c.class_source, str) and c.class_source.startswith("folder:") and c.class_source[7:]):
      raise SanaError(f"data.class_source must be 'folder:DIR', got {short(c.class_source)}")
    if kind != "folder":
      raise SanaError(f"data.class_source needs a folder:DIR source, not {short(c.source)} (precomputed records: "
                      "precompute with --class-images and --class-prompt)")
    if c.class_prompt is None:
      raise SanaError("data.class_source needs data.class_prompt, the caption of every class image")
