"""Optimizers from a config: CAME or AdamW, a warmup + constant/cosine schedule, global-norm
clipping, a weight-decay mask, and an EMA of the parameters.

    tx, schedule = build_optimizer(config.optim, global_batch=1024, total_steps=100_000)

`config.optim` keys (defaults in OPTIM_DEFAULTS):
  name           "came" | "adamw"
  lr             base learning rate, before scaling
  lr_scaling     None | "linear" | "sqrt": lr *= (global_batch / base_batch) or its square root
  base_batch     the batch size `lr` was tuned for (Sana: 256)
  warmup_steps   linear warmup from 0 (the first update uses lr 0, as diffusers' schedulers do)
  schedule       "constant" | "cosine" (from the peak at warmup_steps to end_lr_factor * peak at
                 total_steps)
  end_lr_factor  cosine only
  b1, b2         first/second moment decays; b3: CAME's instability decay (CAME only: with AdamW
                 it must stay at its default, like clip_threshold)
  eps            CAME: (eps1, eps2) = (1e-30, 1e-16); AdamW: a float (default 1e-8)
  clip_threshold CAME's per-tensor update-RMS clipping (CAME only)
  weight_decay   decoupled, times lr, on the leaves `decay_mask` selects
  clip_norm      global gradient-norm clipping before the optimizer; None or 0: off
"""
import math
import re

import jax
import jax.numpy as jnp
import optax

from sana_jax.errors import SanaError
from sana_jax.training.came import Factoring, came

OPTIM_DEFAULTS = dict(
    name="came", lr=1e-4, lr_scaling=None, base_batch=256, warmup_steps=0, schedule="constant",
    end_lr_factor=0.0, b1=0.9, b2=0.999, b3=0.9999, eps=None, clip_threshold=1.0, weight_decay=0.0,
    clip_norm=None)
CAME_ONLY = ("b3", "clip_threshold")
DEFAULT_EPS = dict(came=(1e-30, 1e-16), adamw=1e-8)

# Modules whose parameters carry a leading "layers" axis (the DiT's scanned blocks).
STACKED_MODULES = ("blocks",)

# A path component matching this keeps its leaves out of weight decay: biases, norm weights
# ("norm", "layernorm", "norm_q", ...), modulation tables ("scale_shift_table", "logit_scale") and
# embedding tables ("embedding", "pos_embed"). Linear projections named "*_embed" (patch_embed,
# time_embed) are matrices and do decay.
NO_DECAY_NAME = re.compile(r"bias|norm|(^|_)scale(_|$)|embedding|pos_embed")


# ---------------------------------------------------------------------------------------------
# Parameter paths


def path_names(path) -> list[str]:
  """The names along a jax.tree_util key path. An nnx.State leaf's path ends in the Variable's
  `.value` attribute, which is dropped so plain dicts and nnx.State read the same."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        names.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    else:
      names.append(str(getattr(key, "key", key)))
  return names


def decay_mask(params):
  """Tree of bools (shaped like `params`): True where weight decay applies.

  No decay for leaves of rank <= 1 or with a path component matching NO_DECAY_NAME. The name rule
  is what excludes the stacked block norms and biases, whose leading "layers" axis makes them 2-D.
  Works on nnx.State and on plain nested dicts.
  """
  def decays(path, leaf):
    return jnp.ndim(leaf) > 1 and not any(NO_DECAY_NAME.search(n.lower()) for n in path_names(path))
  return jax.tree_util.tree_map_with_path(decays, params)


def sana_factoring(path, shape) -> Factoring:
  """CAME factoring for this project's layout, matching Sana's CAMEWrapper per layer.

  The reference factors exactly the 2-D parameters (Linear [out, in], the (6, D) modulation
  tables) and 1x1 convs [out, in, 1, 1] over (out, in); everything else (biases, norm weights,
  kxk convs) has a full second moment and no confidence term. Here:
    - a leading "layers" axis under STACKED_MODULES is a stack of independent copies;
    - a Dense kernel is [in, *out] (Mix-FFN's [D, 2, hidden], adaLN's [D, 6, D]): rows = in,
      cols = all output axes, i.e. the reference's [out, in] matrix transposed (the factored
      estimate is transpose-invariant);
    - a conv kernel [kh, kw, in, out] is factored over (kh*kw*in, out) when kh = kw = 1;
    - leaves named *bias* stay unfactored even when shaped ([6, D], [2, hidden]): in the
      reference they are vectors.
  """
  names = path_names(path)
  stacked = int(bool(shape) and any(n in STACKED_MODULES for n in names[:-1]))
  per_layer = shape[stacked:]
  if "bias" in names[-1].lower() or len(per_layer) < 2:
    return Factoring(stacked)
  if len(per_layer) == 4 and per_layer[:2] != (1, 1):
    return Factoring(stacked)
  split = stacked + (3 if len(per_layer) == 4 else 1)
  return Factoring(stacked, rows=tuple(range(stacked, split)), cols=tuple(range(split, len(shape))))


# ---------------------------------------------------------------------------------------------
# Config -> optax


def _resolve(optim) -> dict:
  """The config as a plain dict with defaults filled in; SanaError names any bad key or value."""
  given = dict(optim.items())
  unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
  if unknown:
    raise SanaError(f"optim: unknown key(s) {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
  c = {**OPTIM_DEFAULTS, **given}
  if c["name"] not in DEFAULT_EPS:
    raise SanaError(f"optim.name={c['name']!r}; expected one of {sorted(DEFAULT_EPS)}")
  # shared configs carry CAME's keys at their defaults; a changed one would silently do nothing
  changed = [k for k in CAME_ONLY if c[k] != OPTIM_DEFAULTS[k]]
  if c["name"] != "came" and changed:
    raise SanaError(f"optim: {changed} apply to name='came' only; AdamW has no such setting")
  if c["eps"] is None:
    c["eps"] = DEFAULT_EPS[c["name"]]
  if c["name"] == "came" and (not isinstance(c["eps"], (tuple, list)) or len(c["eps"]) != 2):
    raise SanaError(f"optim.eps={c['eps']!r}; CAME takes a pair (eps1, eps2), e.g. (1e-30, 1e-16)")
  if c["name"] == "adamw" and not isinstance(c["eps"], (int, float)):
    raise SanaError(f"optim.eps={c['eps']!r}; AdamW takes one number, e.g. 1e-8")
  if c["lr_scaling"] not in (None, "linear", "sqrt"):
    raise SanaError(f"optim.lr_scaling={c['lr_scaling']!r}; expected None, 'linear' or 'sqrt'")
  if c["schedule"] not in ("constant", "cosine"):
    raise SanaError(f"optim.schedule={c['schedule']!r}; expected 'constant' or 'cosine'")
  numbers = ("lr", "base_batch", "warmup_steps", "end_lr_factor", "b1", "b2", "b3", "clip_threshold",
             "weight_decay") + (("clip_norm",) if c["clip_norm"] is not None else ())
  for k in numbers:  # NaN passes every comparison below
    if type(c[k]) is bool or not isinstance(c[k], (int, float)) or not math.isfinite(c[k]):
      raise SanaError(f"optim.{k}={c[k]!r}; expected a finite number")
  if c["lr"] <= 0 or c["base_batch"] <= 0 or c["warmup_steps"] < 0:
    raise SanaError(f"optim: lr={c['lr']}, base_batch={c['base_batch']} must be > 0 and "
                    f"warmup_steps={c['warmup_steps']} >= 0")
  return c


def peak_lr(lr, lr_scaling, *, global_batch, base_batch):
  """The base lr scaled for the global batch (Sana's auto_scale_lr)."""
  ratio = global_batch / base_batch
  return lr * {None: 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[lr_scaling]


def lr_schedule(peak, *, warmup_steps, total_steps, kind="constant", end_factor=0.0) -> optax.Schedule:
  """Linear warmup 0 -> peak over warmup_steps, then constant or cosine to end_factor * peak at
  total_steps (held there after)."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(peak, jnp.float32)
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    if kind == "cosine":
      progress = jnp.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
      lr = lr * (end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return lr
  return schedule


def build_optimizer(optim, *, global_batch, total_steps):
  """(optax.GradientTransformation, schedule) from `config.optim` (a dict or ConfigDict).

  The transformation expects `params` in `update` (weight decay reads them) and takes parameter
  trees as nnx.State or plain dicts. `schedule(step)` is the lr the step-th update uses.
  """
  c = _resolve(optim)
  if c["schedule"] == "cosine" and total_steps <= c["warmup_steps"]:
    raise SanaError(f"optim: cosine schedule needs total_steps={total_steps} > warmup_steps={c['warmup_steps']}")
  peak = peak_lr(c["lr"], c["lr_scaling"], global_batch=global_batch, base_batch=c["base_batch"])
  schedule = lr_schedule(peak, warmup_steps=c["warmup_steps"], total_steps=total_steps, kind=c["schedule"],
                         end_factor=c["end_lr_factor"])
  if c["name"] == "came":
    tx = came(schedule, c["b1"], c["b2"], c["b3"], tuple(c["eps"]), c["clip_threshold"], c["weight_decay"],
              mask=decay_mask, factoring=sana_factoring)
  else:
    tx = optax.adamw(schedule, c["b1"], c["b2"], c["eps"], weight_decay=c["weight_decay"], mask=decay_mask)
  if c["clip_norm"]:
    tx = optax.chain(optax.clip_by_global_norm(c["clip_norm"]), tx)
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# EMA


def ema_init(params):
  """A float32 copy of the parameters: the EMA starts at the initial (or loaded) weights. Always a
  copy, never the same buffer (float32 params included): the train step donates both."""
  return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in float32.

  A constant decay, as Sana (ema_rate 0.9999): the EMA starts as a copy of the weights rather
  than at zero, so it needs no bias correction; for a run from scratch, a lower decay or an EMA
  started later keeps it from lagging the early, fast-moving weights. `decay` may be traced.
  """
  decay = jnp.asarray(decay, jnp.float32)
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
