"""Every value of a training config checked before any work: `check(config, workdir)`.

train.py calls it before joining other processes, `loop.train` before it builds the mesh, data or
model, so a bad value costs a second, not a compile. Errors name the key as the config spells it
(`config.checkpoint_every`) and are one short line. A value of the wrong type given on the command
line (`--config.total_steps=abc`) is already refused by ml_collections; NaN and infinities are caught
here. What needs the devices (the batch split over the mesh) is checked where the mesh is built.
"""
import math
import os

from sana_jax import dtypes, files
from sana_jax import fields as F
from sana_jax.errors import SanaError, short

MAX_STEPS = 2**31 - 1  # the train state counts steps in int32
WEIGHTINGS = ("logit_normal", "uniform")


def check(config, workdir):
  """SanaError for the first bad value; creates `workdir` (and its parents) when all is well."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise SanaError(f"workdir {workdir} exists and is not a directory")  # created at the end, when all is well

  def at_least(key, lo, default=None):
    return F.integer(lo, MAX_STEPS)(_get(config, key, default), f"config.{key}")

  total_steps = at_least("total_steps", 1)
  at_least("log_every", 1)
  at_least("checkpoint_every", 1)
  at_least("keep_checkpoints", 1)
  at_least("max_nonfinite_steps", 1)
  batch_size = at_least("batch_size", 1)
  grad_accum = at_least("grad_accum", 1, 1)
  if batch_size % grad_accum:
    raise SanaError(f"config.batch_size={batch_size} does not split into config.grad_accum={grad_accum} "
                    f"microbatches")
  F.integer(-MAX_STEPS, MAX_STEPS)(config.get("seed", 0), "config.seed")
  F.boolean(config.get("async_checkpoints", True), "config.async_checkpoints")

  ema = F.real(0, 1)(config.get("ema_decay", 0.0), "config.ema_decay")
  if ema >= 1:
    raise SanaError(f"config.ema_decay = {short(ema)}: expected a number in [0, 1) (0 keeps no EMA)")

  o = config.objective
  F.choice(*WEIGHTINGS)(o.get("weighting"), "config.objective.weighting")
  F.real()(o.get("logit_mean", 0.0), "config.objective.logit_mean")
  F.real(above=0)(o.get("logit_std", 1.0), "config.objective.logit_std")
  F.real(above=0)(o.get("flow_shift", 1.0), "config.objective.flow_shift")
  F.real(0, 1)(o.get("caption_dropout", 0.0), "config.objective.caption_dropout")
  F.boolean(o.get("integer_timesteps", False), "config.objective.integer_timesteps")

  lr = config.optim.get("lr")
  if type(lr) is bool or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
    raise SanaError(f"config.optim.lr = {short(lr, 40)}: expected a finite number > 0")

  if at_least("eval.every", 0, 0):
    at_least("eval.batches", 1)
    F.sequence(F.real(0, 1), min_len=1)(config.eval.get("sigmas"), "config.eval.sigmas")
  if at_least("sample.every", 0, 0):
    s = config.sample
    if not s.get("model_dir"):
      raise SanaError("config.sample.every is set but config.sample.model_dir is empty: it names a "
                      "diffusers-format directory with the tokenizer, text encoder and vae")
    at_least("sample.steps", 1)
    F.real()(s.get("guidance_scale"), "config.sample.guidance_scale")
    F.sequence(F.text(), min_len=1)(tuple(s.get("prompts") or ()), "config.sample.prompts")

  _check_lora(config)
  _check_controlnet(config)
  _check_encoders(config)

  # the checks above import nothing heavy; these two need jax
  from sana_jax.training import optimizers
  try:
    optimizers.build_optimizer(config.optim, global_batch=batch_size, total_steps=total_steps)
  except SanaError as e:
    raise SanaError(f"config.{e}") from None  # its messages start with the key: "optim.name=..."
  F.choice(*dtypes.DTYPES)(config.get("dtype"), "config.dtype")

  files.output_directory(workdir, "workdir")


def _check_lora(config):
  lora = config.get("lora")
  if lora is None:
    return
  known = {"rank", "alpha", "targets", "dropout"}
  unknown = sorted(set(lora) - known)
  if unknown:
    raise SanaError(f"config.lora: unknown key(s) {unknown}; known: {sorted(known)}")
  if not F.integer(0, 4096)(lora.get("rank", 0), "config.lora.rank"):
    return
  if lora.get("alpha") is not None:
    F.real(above=0, hi=1e6)(lora["alpha"], "config.lora.alpha")
  F.sequence(F.text(), min_len=1)(tuple(lora.get("targets") or ()), "config.lora.targets")
  if F.real(0, 1)(lora.get("dropout", 0.0), "config.lora.dropout"):
    raise SanaError("config.lora.dropout > 0 is not supported: the adapter is added to the weights inside the step, "
                    "where dropout on a layer's input cannot act on the adapter alone; use 0.0")
  if not config.get("init_from"):
    raise SanaError("config.lora needs config.init_from: the diffusers transformer directory whose weights it adapts")


def _check_controlnet(config):
  c = config.get("controlnet")
  if c is None:
    return
  known = {"num_layers", "conditioning_scale"}
  unknown = sorted(set(c) - known)
  if unknown:
    raise SanaError(f"config.controlnet: unknown key(s) {unknown}; known: {sorted(known)}")
  depth = config.model.get("num_layers", 0)
  n = F.integer(0, MAX_STEPS)(c.get("num_layers", 0), "config.controlnet.num_layers")
  if not n:
    return
  if n >= depth:
    raise SanaError(f"config.controlnet.num_layers={n}: expected 1 to {depth - 1}, fewer than the base's "
                    f"{depth} blocks (diffusers adds residual k after base block k + 1)")
  F.real(-1e3, 1e3)(c.get("conditioning_scale", 1.0), "config.controlnet.conditioning_scale")
  if (config.get("lora") or {}).get("rank", 0):
    raise SanaError("config.controlnet and config.lora are exclusive: train one at a time")
  if config.model.get("guidance_embeds") or config.model.get("qk_norm"):
    raise SanaError("config.controlnet: a Sana ControlNet steers a base without guidance embedding and q/k norms "
                    "(Sana 1.0 layout), as diffusers' SanaControlNetModel")
  if not config.get("init_from"):
    raise SanaError("config.controlnet needs config.init_from: the diffusers transformer directory it steers "
                    "(its first blocks start the ControlNet's)")
  if config.get("sample", {}).get("every", 0):
    raise SanaError("config.sample.every with config.controlnet: preview samples need condition images, which "
                    "the config cannot name yet; set config.sample.every=0 and sample the export")


def _check_encoders(config):
  from sana_jax.data.config import IMAGE_SOURCES
  path = config.get("encoders") or ""
  kind = str(config.data.get("source", "")).partition(":")[0]
  if not path:
    if kind in IMAGE_SOURCES:
      raise SanaError(f"config.data.source={config.data.source!r} holds images: set config.encoders to the "
                      "diffusers pipeline directory whose DC-AE and text encoder encode them in the step, or "
                      "precompute the dataset")
    return
  F.text()(path, "config.encoders")
  if kind not in IMAGE_SOURCES:
    raise SanaError(f"config.encoders encodes raw images: it needs a folder:DIR, packed:DIR or tfds:NAME "
                    f"data.source, not {config.data.get('source')!r}")
  if not os.path.isdir(os.path.expanduser(path)):
    raise SanaError(f"config.encoders={path!r} is not a directory (a diffusers-format Sana pipeline)")
  if (config.get("controlnet") or {}).get("num_layers", 0):
    raise SanaError("config.encoders with config.controlnet: condition images are not encoded online yet; "
                    "precompute with --control")


def _get(config, dotted, default):
  """config["a"]["b"] for "a.b", or `default` where a level is missing."""
  node = config
  *parents, key = dotted.split(".")
  for name in parents:
    node = node.get(name) if node is not None else None
  return default if node is None else node.get(key, default)
