"""Memory plans: the train step compiled on abstract inputs (no weights, no data) and what each device holds.

  python -m sana_jax.training.plan --config configs/sana_600m_online.py:res=512,target=gpu8 --devices 8 --target h100
  python -m sana_jax.training.plan --config configs/sana_1600m_online.py:target=tpu64 --devices 64 --target v5e \
      --max-batch
  python -m sana_jax.training.plan --config configs/tiny.py --devices 2 --config.mesh.fsdp=2

The step is the one train.py runs: the run's Trainer, its jitted step lowered on ShapeDtypeStructs that carry
the run's shardings, compiled. Peak per device = what lives on the device (each tree's local shard: parameters,
optimizer state, EMA, frozen base, encoder weights, batch) + what the step allocates (XLA's memory analysis:
temporaries, i.e. activations, gradients and optimizer work, and outputs that do not reuse a donated input).

`--devices N` simulates N devices on this host's CPU (the mesh of a GPU host or a TPU slice) and compiles with
XLA:CPU, whose buffer assignment estimates a GPU's or TPU's (fusion differs): a target's usable memory is its
HBM less `--headroom` (10%), which also covers the runtime's reserve and fragmentation. Without --devices the
plan compiles for this host's own devices and, on a GPU or TPU, compares with their own limit. The batch
planned is the configured one in the largest bucket (most pixels) of the data config.

A run from raw images (config.encoders) plans its DC-AE and Gemma-2 from their architectures alone: the pipeline
directory's configs and tokenizer when the directory exists, else the config's `plan_encoders` block (the
released ones in configs/online.py). Weights are never read.

`--max-batch`: the largest batch per device that fits, from a line through the peaks compiled at 1 row per
device and at the configured batch (the activations grow linearly in the batch, the rest is fixed), its
prediction checked by a compile and, when that does not fit, moved down along the line through the nearest
measured points until one fits: 3 or 4 compiles, each of them minutes for Sana 1.6B with its encoders on a CPU
(docs/benchmarks.md).

train.py makes the same comparison before its first step (`check_step_fits`): the device's bytes in use plus
the compiled step's, against its memory_stats()["bytes_limit"], with the compile the first step then reuses. CPU
runs skip it (XLA:CPU keeps no memory statistics, and the host's memory is not a device's to plan). It checks the
first batch's bucket; with aspect-ratio buckets the plan's largest bucket is the one to trust.
"""
import json
import math
import os
import sys
import time

import numpy as np

from sana_jax import errors
from sana_jax.errors import SanaError

GIB = 2**30
TARGETS = {"h100": 80, "h200": 141, "v5e": 16, "v5p": 95, "v6e": 32}  # HBM per device, GiB
HEADROOM = 0.1  # of a target's HBM, kept free: XLA:CPU's estimate vs the device compiler, runtime reserve
MAX_SEARCH_COMPILES = 6


# ---- the step on abstract inputs ---------------------------------------------------------------------


class AbstractEncoders:
  """The online encoders (encoders.OnlineEncoders) without their weights: the DC-AE's and Gemma-2's graphs, and
  ShapeDtypeStructs with the run's shardings in place of the arrays. `encode` is OnlineEncoders' own."""

  def __init__(self, vae_cfg, text_cfg, mesh, rules, *, dtype, keep, token_length, source):
    import jax
    from flax import nnx

    from sana_jax import parallel
    from sana_jax.models.dcae import DCAE
    from sana_jax.models.gemma import GemmaTextEncoder
    vae = nnx.eval_shape(lambda: DCAE(vae_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    text = nnx.eval_shape(lambda: GemmaTextEncoder(text_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    self.scaling_factor = float(vae_cfg.scaling_factor)
    self._vae_graph, vae_state = nnx.split(vae)
    self._text_graph, text_state = nnx.split(text)
    self.shardings = {"vae": parallel.state_shardings(vae_state, mesh, rules),
                      "text": parallel.state_shardings(text_state, mesh, rules)}
    self.params = jax.tree.map(lambda s, var: with_sharding(var, s), self.shardings,
                               {"vae": vae_state, "text": text_state})
    self.mesh, self.rules = mesh, rules
    self._keep = np.asarray(keep)  # the token positions the DiT sees (encode reads it)
    self.token_length, self.caption_length = token_length, len(self._keep)
    self.text_width, self.source = text_cfg.hidden_size, source

  def encode(self, params, batch):
    from sana_jax.training.encoders import OnlineEncoders
    return OnlineEncoders.encode(self, params, batch)


def abstract_encoders(config, mesh, rules, dtype):
  """AbstractEncoders of `config.encoders`: from the directory's configs and tokenizer when it exists (what the
  run will load), else from `config.plan_encoders` (architectures, the CHI's token count, max_sequence_length)."""
  from flax import nnx

  from sana_jax.models.dcae import DCAEConfig
  from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder
  path = os.path.expanduser(str(config.encoders))
  if os.path.isdir(path):
    from sana_jax.convert import diffusers_dcae, pipelines, transformers_gemma
    from sana_jax.text import PromptEncoder
    _, vae_cfg = diffusers_dcae.read_config(pipelines.component_dir(path, "vae"))
    _, text_cfg = transformers_gemma.read_config(pipelines.component_dir(path, "text_encoder"))
    settings = {k: v for k, v in pipelines.model_settings(path).items() if k in pipelines.TEXT_SETTINGS}
    settings.setdefault("max_sequence_length", 300)  # as precompute.encoder_parts
    tokenizer = pipelines.load_tokenizer(pipelines.component_dir(path, "tokenizer"))
    text = nnx.eval_shape(lambda: GemmaTextEncoder(text_cfg, rngs=nnx.Rngs(0)))
    ids, _, keep = PromptEncoder(tokenizer, text, **settings).positive_tokens([""])
    return AbstractEncoders(vae_cfg, text_cfg, mesh, rules, dtype=dtype, keep=keep, token_length=ids.shape[1],
                            source=f"directory {path}")
  p = config.get("plan_encoders")
  if not p:
    raise SanaError(f"config.encoders={errors.short(config.encoders, 120)} is not a directory and the config has no "
                    "plan_encoders block: give the pipeline directory, or the architectures (configs/online.py)")
  vae_cfg = DCAEConfig.from_dict(p.vae, source="config.plan_encoders.vae")
  text_cfg = GemmaConfig.from_transformers(p.text_encoder.to_dict(), source="config.plan_encoders.text_encoder")
  length, chi = int(p.max_sequence_length), int(p.chi_tokens)
  tokens = chi + length - 2 if chi else length  # as PromptEncoder.positive_tokens
  keep = np.concatenate([[0], np.arange(tokens - length + 1, tokens)])
  return AbstractEncoders(vae_cfg, text_cfg, mesh, rules, dtype=dtype, keep=keep, token_length=tokens,
                          source="config.plan_encoders")


def with_sharding(tree, sharding):
  """ShapeDtypeStructs of `tree`'s arrays (or ShapeDtypeStructs) carrying `sharding`."""
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def local_bytes(tree):
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs: its own shard of every leaf."""
  import jax
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.shape if getattr(a, "sharding", None) is None else a.sharding.shard_shape(a.shape)
    total += math.prod(shape) * np.dtype(a.dtype).itemsize
  return total


def step_bytes(memory):
  """What a step allocates beyond its inputs, per device: temporaries and the outputs that do not reuse a donated
  input's buffer."""
  return memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes


class StepPlan:
  """The run's Trainer on abstract weights (encoders and frozen base included), its abstract state and inputs;
  `compile(rows)` compiles its step for `rows` examples per device."""

  def __init__(self, config, mesh, rules=None):
    from sana_jax import data, dtypes
    from sana_jax.training.trainer import Trainer
    self.config, self.mesh = config, mesh
    self.split = mesh.shape["data"] * mesh.shape["fsdp"]  # devices the batch is split over
    self.accum = int(config.get("grad_accum", 1))
    if config.batch_size % (self.split * self.accum):
      raise SanaError(f"config.batch_size={config.batch_size} does not split over data x fsdp = {self.split} devices "
                      f"times config.grad_accum={self.accum}; make it a multiple of {self.split * self.accum}")
    self.rows = config.batch_size // self.split  # per device and step
    dtype = dtypes.resolve(config.dtype, "config.dtype")
    self.encoders = abstract_encoders(config, mesh, rules, dtype) if config.get("encoders") else None
    self.trainer = t = Trainer(config, mesh, rules, online_encoders=self.encoders)
    if t.lora is not None or t.control is not None:
      t.frozen = with_shardings(t.base_abstract, t.base_shardings)
    self.state = t.abstract_state()
    d = data.resolve(config.data)
    table = data.bucket_table(d.buckets, d.latent_size, d.spatial_compression)
    _, self.height, self.width = max(table, key=lambda b: (b[1] * b[2], -abs(b[1] - b[2])))  # most pixels, squarest
    self.data = d

  def parts(self, rows):
    """Bytes per device of what lives on the devices while the step runs, {name: bytes}: the train state, frozen
    base and encoder weights (all of them: jit drops the DC-AE decoder from the step's arguments, but the run holds
    it), and the batch."""
    s = self.state
    return {"parameters": local_bytes(s.params), "optimizer state": local_bytes((s.opt_state, s.step, s.nonfinite,
                                                                                 s.skipped)),
            "EMA": local_bytes(s.ema), "frozen base": local_bytes(self.trainer.frozen),
            "encoders": local_bytes(self.encoders.params if self.encoders else None),
            "batch": local_bytes(self.inputs(rows))}

  def inputs(self, rows):
    """Abstract (batch, null_text) for `rows` examples per device, shaped as put_batch and the data give them."""
    import jax
    import jax.numpy as jnp
    n, d, t = rows * self.split, self.data, self.trainer
    f = d.spatial_compression
    if self.encoders:
      shapes = dict(images=((n, self.height, self.width, 3), jnp.float32),
                    ids=((n, self.encoders.token_length), jnp.int32),
                    tokens_mask=((n, self.encoders.token_length), jnp.int32))
      length, width = self.encoders.caption_length, self.encoders.text_width
    else:
      latents = (n, self.height // f, self.width // f, d.latent_channels)
      shapes = dict(latents=(latents, jnp.float32), y=((n, d.caption_length, d.caption_channels), jnp.float32),
                    mask=((n, d.caption_length), jnp.int32))
      if t.control is not None:
        shapes["control"] = (latents, jnp.float32)
      length, width = d.caption_length, d.caption_channels
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=t.batch_shardings[k]) for k, (s, dt) in shapes.items()}
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    null_text = (jax.ShapeDtypeStruct((length, width), jnp.float32, sharding=replicated),
                 jax.ShapeDtypeStruct((length,), jnp.int32, sharding=replicated))
    return batch, null_text

  def compile(self, rows):
    """(peak bytes per device, XLA's memory analysis, compile seconds) of the step for `rows` examples per device.
    Peak: what lives on the devices (`parts`) plus what the step allocates (`step_bytes`)."""
    batch, null_text = self.inputs(rows)
    began = time.perf_counter()
    memory = self.trainer.lower_step(self.state, batch, null_text).compile().memory_analysis()
    seconds = time.perf_counter() - began
    return sum(self.parts(rows).values()) + step_bytes(memory), memory, seconds

  def largest_fitting(self, usable, known=None):
    """(rows per device, {rows: peak bytes} compiled): the largest multiple of grad_accum whose peak fits in
    `usable` bytes. A line through two compiled batches (1 microbatch per device and the configured batch, or 2)
    predicts it; a compile checks the prediction, and the line through the nearest points moves it down until one
    fits (see the module docstring). `known`: {rows: peak} already compiled."""
    peaks = dict(known or {})

    def peak(units):
      rows = units * self.accum
      if rows not in peaks:
        peaks[rows] = self.compile(rows)[0]
      return peaks[rows]

    if peak(1) > usable:
      return 0, peaks
    units = sorted(r // self.accum for r in peaks if r % self.accum == 0)
    lo = max(u for u in units if peak(u) <= usable)
    hi = min((u for u in units if peak(u) > usable), default=None)
    if lo == 1 and hi is None:
      lo, hi = (2, None) if peak(2) <= usable else (1, 2)
    for _ in range(MAX_SEARCH_COMPILES):
      if hi == lo + 1:
        break
      a, b = (lo, hi) if hi is not None else (max(u for u in units + [1] if u < lo), lo)
      slope = max((peak(b) - peak(a)) / (b - a), 1.0)
      guess = lo + int((usable - peak(lo)) // slope)
      guess = guess if hi is None else min(guess, hi - 1)
      if guess <= lo:
        break
      units.append(guess)
      if peak(guess) > usable:
        hi = guess
      else:
        lo = guess
        if hi is None:
          break  # the line's prediction fits, and the line says one more would not
    return lo * self.accum, peaks


def with_shardings(tree, shardings):
  import jax
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


# ---- the plan and its verdict ------------------------------------------------------------------------


def make_plan(config, *, devices=None, target=None, headroom=HEADROOM, max_batch=False, name=""):
  """The plan as a dict (what the CLI prints as JSON): per-device bytes of each part, XLA's figures, and for a
  `target` (a TARGETS name, GiB of HBM, or None: this host's device limit where it has one) whether the step fits."""
  import jax

  from sana_jax import parallel
  devices = jax.devices() if devices is None else devices
  device = devices[0]
  hbm = limit = None
  if target is not None:
    hbm = TARGETS.get(target, target) * GIB
    limit = hbm * (1 - headroom)
  elif device.platform != "cpu":
    limit = device_memory_stats(device).get("bytes_limit")
  if max_batch and limit is None:
    raise SanaError(f"--max-batch needs a memory limit: give --target ({', '.join(TARGETS)} or GiB) or plan on the "
                    "accelerator itself")
  mesh = parallel.mesh_from_config(config.mesh, devices=devices)
  plan = StepPlan(config, mesh, parallel.rules_from_config(config.get("sharding_rules")))
  peak, memory, seconds = plan.compile(plan.rows)
  parts = plan.parts(plan.rows) | {"temporaries": memory.temp_size_in_bytes,
                                   "outputs (not donated)": memory.output_size_in_bytes - memory.alias_size_in_bytes}
  xla = dict(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
             aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes)
  out = dict(
      plan=name, platform=device.platform, device_kind=device.device_kind, devices=len(devices),
      simulated=device.platform == "cpu" and len(devices) > 1, mesh=dict(mesh.shape), batch=config.batch_size,
      per_device=plan.rows, grad_accum=plan.accum, pixels=[plan.height, plan.width],
      latents=[plan.height // plan.data.spatial_compression, plan.width // plan.data.spatial_compression],
      remat=config.model.get("remat", "none"), dtype=str(config.dtype),
      encoders=plan.encoders.source if plan.encoders else None,
      bytes=parts | {"peak": peak}, gib={k: round(v / GIB, 3) for k, v in (parts | {"peak": peak}).items()},
      xla_bytes=xla, target=target if target is not None else (device.device_kind if limit else None),
      hbm_gib=None if hbm is None else hbm / GIB, usable_gib=None if limit is None else round(limit / GIB, 2),
      headroom=headroom if target is not None else None, fits=None if limit is None else bool(peak <= limit),
      compile_seconds=round(seconds, 1))
  if max_batch:
    began = time.perf_counter()
    rows, peaks = plan.largest_fitting(limit, known={plan.rows: peak})
    out.update(max_per_device=rows, max_batch=rows * plan.split,
               search={str(r): round(p / GIB, 3) for r, p in sorted(peaks.items())},
               search_seconds=round(time.perf_counter() - began, 1))
  return out


def device_memory_stats(device=None):
  """A device's memory_stats() (bytes_limit, bytes_in_use, ...); {} where it keeps none (CPU)."""
  import jax
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return {}
  try:
    return device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without memory statistics
    return {}


def check_step_fits(trainer, state, batch, null_text, *, limit=None, in_use=None):
  """Refuses, with a one-line SanaError, a train step that cannot fit in a device's memory: train.py's check before
  its first step. Need: the bytes already in use on the device (the state, encoders and batch among them) plus what
  the compiled step allocates. limit, in_use: bytes per device; None reads the device's memory_stats() (bytes_limit,
  bytes_in_use), and where it has none (CPU) the check is skipped; an injected limit without in_use counts the
  step's own arguments. The compile is the one the first step then runs (jit reuses it). Returns the need, or None."""
  if limit is None:
    stats = device_memory_stats()
    if stats.get("bytes_limit") is None:
      return None
    limit, in_use = stats["bytes_limit"], stats.get("bytes_in_use")
  memory = trainer.lower_step(state, batch, null_text).compile().memory_analysis()
  need = (memory.argument_size_in_bytes if in_use is None else in_use) + step_bytes(memory)
  if need > limit:
    hint = ", or raise XLA_PYTHON_CLIENT_MEM_FRACTION (JAX takes 75% of a GPU)" if _gpu() else ""
    raise SanaError(f"the train step needs {need / GIB:.1f} GiB per device but a device allows {limit / GIB:.1f} GiB: "
                    f"lower config.batch_size, raise config.grad_accum, set config.model.remat or shard more "
                    f"(config.mesh.fsdp){hint}; python -m sana_jax.training.plan --max-batch finds the batch that fits")
  return need


def _gpu():
  import jax
  return jax.local_devices()[0].platform == "gpu"


# ---- the command line --------------------------------------------------------------------------------


def table(plan):
  """The plan as a few readable lines."""
  unit, scale = ("GiB", GIB) if plan["bytes"]["peak"] >= GIB else ("MiB", 2**20)
  mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  n = plan["devices"]
  where = f"{n} simulated CPU devices" if plan["simulated"] else f"{n} x {plan['device_kind']}"
  shape = "{}x{} px images".format(*plan["pixels"]) if plan["encoders"] else "{}x{} latents".format(*plan["latents"])
  lines = [f"plan {plan['plan']} on {where}, mesh {mesh}",
           f"batch {plan['batch']} = {plan['per_device']} per device (grad_accum {plan['grad_accum']}), {shape}, "
           f"remat {plan['remat']}, {plan['dtype']}",
           f"{'per device':<26}{unit:>9}"]
  notes = {"encoders": "DC-AE + Gemma-2, " + (plan["encoders"] or "none"), "batch": "and the null caption",
           "temporaries": "activations, gradients, optimizer work"}
  for k, v in plan["bytes"].items():
    if k != "peak":
      lines.append(f"  {k:<24}{v / scale:>9.2f}   {notes.get(k, '')}".rstrip())
  lines.append(f"  {'peak':<24}{plan['bytes']['peak'] / scale:>9.2f}   the sum")
  if plan["fits"] is None:
    lines.append("no target: give --target " + "|".join(TARGETS))
  else:
    hbm = f"{plan['hbm_gib']:g} GiB HBM, {plan['usable_gib']:g} usable ({plan['headroom']:.0%} headroom)" \
        if plan["hbm_gib"] else f"{plan['usable_gib']:g} GiB bytes_limit"
    lines.append(f"target {plan['target']}: {hbm}: {'FITS' if plan['fits'] else 'DOES NOT FIT'}")
  if "max_per_device" in plan:
    tried = ", ".join(f"{r}: {p:.2f}" for r, p in plan["search"].items())
    most = (f"{plan['max_per_device']} per device = {plan['max_batch']}" if plan["max_per_device"]
            else "none, not even 1 per device")
    lines.append(f"largest batch that fits: {most} (peak GiB by rows per device: {tried}; {plan['search_seconds']} s)")
  lines.append(f"compiled in {plan['compile_seconds']} s")
  return "\n".join(lines)


def flag_error(error):
  """A flags or config-loading error as one line: its first line, with its last where the first only
  introduces it; an override of a key the config lacks says so. (train.py's too.)"""
  cause = error.args[0] if isinstance(error, AttributeError) and error.args else None
  if isinstance(cause, KeyError):
    return f"--config override: the config has no key {str(cause.args[0]).strip(chr(39))!r}"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
  if "Failed loading config file" in lines[0]:
    return f"cannot load --config: {lines[-1]}"
  return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def parse(argv):
  """(options, config, config name) from the command line; --config and its overrides go to ml_collections."""
  from absl import flags
  from ml_collections import config_flags
  p = errors.ArgumentParser(prog="python -m sana_jax.training.plan", description=__doc__.splitlines()[0],
                            allow_abbrev=False, epilog="--config FILE[:ARG] (required) and --config.KEY=VALUE "
                            "overrides as in train.py")
  p.add_argument("--devices", type=int, help="simulate this many devices on the CPU (default: this host's own)")
  p.add_argument("--target", type=_target, help="the device to fit: " +
                 ", ".join(f"{k} ({v} GiB)" for k, v in TARGETS.items()) + ", or its HBM in GiB")
  p.add_argument("--headroom", type=float, default=HEADROOM, help="fraction of the target's HBM kept free")
  p.add_argument("--max-batch", action="store_true", help="also find the largest batch per device that fits")
  args, rest = p.parse_known_args(argv[1:])
  if args.devices is not None and not 1 <= args.devices <= 4096:
    raise SanaError(f"--devices {args.devices}: expected 1 to 4096")
  if not 0 <= args.headroom < 1:
    raise SanaError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=values, lock_config=True)
  try:
    extra = values([argv[0], *rest])
    config = holder.value
    if config is not None:
      config.get("batch_size")  # a config file that failed to load raises on first use
  except SanaError:
    raise
  except Exception as e:  # noqa: BLE001 - a bad flag, config file or override
    raise SanaError(flag_error(e)) from None
  if len(extra) > 1:
    raise SanaError(f"unexpected argument {errors.short(extra[1])}")
  if config is None:
    raise SanaError("--config is required")
  return args, config, _config_name(rest)


def _target(value):
  """--target: a TARGETS name or GiB of HBM per device."""
  if value in TARGETS:
    return value
  try:
    gib = float(value)
  except ValueError:
    gib = math.nan
  if not (math.isfinite(gib) and gib > 0):
    raise SanaError(f"--target {errors.short(value)}: expected one of {', '.join(TARGETS)} or GiB of HBM (> 0)")
  return gib


def _config_name(rest):
  """The --config value as given (FILE[:ARG]), for the plan's title."""
  for i, arg in enumerate(rest):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config" and i + 1 < len(rest):
      return rest[i + 1]
  return ""


@errors.cli_main
def main(argv):
  args, config, name = parse(argv)
  import jax
  if args.devices:  # before anything touches the backend
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
  plan = make_plan(config, target=args.target, headroom=args.headroom, max_batch=args.max_batch, name=name)
  print(table(plan))
  print(json.dumps(plan), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
