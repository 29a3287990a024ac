"""Orbax checkpoints of a run: the train state, the data iterator's position and the resolved config.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when the
save is complete), so a run killed mid-save resumes from the last complete checkpoint. Every process
takes part in saving and restoring; the state is restored straight onto the current mesh, whatever
mesh it was saved from.

Resuming (`restore_latest`) takes the newest step that restores. A step that does not (a truncated or
missing file, an empty or foreign directory named like a step) is damaged: process 0 renames it to
`checkpoints/<step>.corrupt-<n>`, where orbax no longer lists it, with one warning line, and the next
newer step is tried; when none restores the run starts afresh. A step saved by a different config
(other shapes or another optimizer) is not damaged: that is an error, and nothing is moved. So is a
read that fails for a reason outside the files (no permission, out of memory, storage unavailable).

Multi-process runs: every process tries the same step and the processes agree on the outcome (an
all-gather of one flag) before anything is moved, so all resume from the same step. A file only
one process reads (its own shard) fails on that process alone; the others then wait in orbax's
restore barrier until it times out, and the step counts as damaged on all of them.
"""
import base64
import contextlib
import errno
import gc
import json
import logging
import os
import sys
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from sana_jax.errors import SanaError, one_line, short
from sana_jax.training.optimizers import path_names
from sana_jax.training.runlog import warn
from sana_jax.training.trainer import TrainState

_FIELDS = ("step", "params", "opt_state", "ema", "nonfinite", "skipped")
_OK, _DAMAGED, _FAILED = 0, 1, 2
# Read errors that say nothing about the files: tensorstore's status codes for them, and OS errors.
_NOT_DAMAGE = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
               "CANCELLED", "ABORTED", "Out of memory")
_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
# what an abandoned read's never-retrieved task or future says: orbax's code, the closed loop, or a
# tensorstore read error (a future set from native code carries no Python frames)
_ABANDONED_READ_MARKS = (_ORBAX_DIR, "Event loop is closed", "OCDBT database", "Error reading")
_DAMAGE_TYPES = (ValueError, KeyError, IndexError, EOFError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class Checkpointer:

  def __init__(self, workdir, *, keep=3, async_save=True, read_only=False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.damaged_steps = []  # the steps restore_latest found damaged (and moved aside)
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                           enable_async_checkpointing=async_save, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    with _orbax_quiet():  # it warns about each step directory without orbax's metadata: restore_latest says more
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_state, config):
    """Starts an asynchronous save; returns at once (the next save or `wait` joins it)."""
    items = dict(state=ocp.args.StandardSave(_as_dict(state)), data=ocp.args.JsonSave(_encode(data_state)),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, step=None):
    """(train state placed as `abstract_state`'s shardings say, data iterator state) of `step` (latest).
    A missing, damaged or mismatched step is a SanaError."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise SanaError(f"{self.directory}: no checkpoint at step {step}; saved steps: {short(self.all_steps())}")
    outcome, result = self._try_restore(step, abstract_state)
    if outcome != _OK:
      raise SanaError(f"checkpoint step {step} in {self.directory} does not restore: {_describe(result)}")
    return result

  def restore_latest(self, abstract_state, *, move_aside=True):
    """(step, train state, data state) of the newest step that restores, or None when none does.

    Damaged steps are skipped with a warning and, with `move_aside` (training), renamed out of orbax's
    sight by process 0, so that later saves and `keep` never meet them again. Every process must call it.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      outcome, result = self._try_restore(step, abstract_state)
      outcomes = _all_processes(outcome)
      if max(outcomes) == _FAILED:
        cause = _describe(result) if outcome == _FAILED else f"process {outcomes.index(_FAILED)} could not read it"
        raise SanaError(f"cannot read checkpoint step {step} in {self.directory}: {cause}")
      if max(outcomes) == _OK:
        return (step, *result)
      cause = _describe(result) if outcome == _DAMAGED else f"it fails to restore on process {outcomes.index(_DAMAGED)}"
      self.damaged_steps.append(step)
      if move_aside:
        where = self._move_aside(step)
        # where it went first: the cause can be long, and warn() cuts the line
        warn(f"checkpoint step {step} does not restore; moved it to {where} ({cause})")
      else:
        warn(f"checkpoint step {step} in {self.directory} does not restore ({cause}); skipped")
    return None

  def _try_restore(self, step, abstract_state):
    """(_OK, (state, data state)), (_DAMAGED, the error) or (_FAILED, the error) for one step; a step
    saved by another config is a SanaError."""
    _drop_abandoned_read_noise()
    with _orbax_quiet():
      try:
        saved = self.manager.item_metadata(step).get("state")
        if saved is None:
          raise ValueError("no train state in it (not a complete checkpoint)")
        _check_fits(step, saved, _as_dict(abstract_state), self.directory)
        items = dict(state=ocp.args.StandardRestore(_as_dict(abstract_state)), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if restored.get("data") is None:
          raise ValueError("no data iterator state in it (not a complete checkpoint)")
        return _OK, (TrainState(**restored["state"]), _decode(restored["data"]))
      except SanaError:
        raise
      except Exception as e:  # noqa: BLE001 - sorted into damage, trouble reading, and bugs below
        gc.collect()  # the abandoned reads report now, while orbax's loggers are quiet
        if _outside_the_files(e):
          return _FAILED, e
        if isinstance(e, _DAMAGE_TYPES) or type(e) is Exception:  # orbax wraps tensorstore errors in Exception
          return _DAMAGED, e
        raise

  def _move_aside(self, step):
    """Process 0 renames the step directory to `<step>.corrupt-<n>`; all processes wait for it and
    re-read the list of steps. Returns the new path."""
    source = self._step_path(step)
    n = 1
    while os.path.lexists(f"{source}.corrupt-{n}"):
      n += 1
    target = f"{source}.corrupt-{n}"
    if jax.process_index() == 0:
      try:
        os.rename(source, target)
      except OSError as e:
        raise SanaError(f"checkpoint step {step} does not restore and cannot be moved aside "
                        f"({source} -> {target}: {e.strerror}); move or delete it, then restart") from None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"sana-jax checkpoint {step} moved aside")
    with _orbax_quiet():
      self.manager.reload()
    return target

  def _step_path(self, step):
    names = [n for n in os.listdir(self.directory) if n.isdigit() and int(n) == step]
    return os.path.join(self.directory, names[0] if names else str(step))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _as_dict(state):
  return {name: getattr(state, name) for name in _FIELDS}


def _check_fits(step, saved, wanted, directory):
  """A SanaError when the saved tree (orbax metadata) and the restore target differ in names or shapes:
  the step was saved by another model or optimizer config, and no step of this run will fit."""
  def shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(path_names(path)): tuple(leaf.shape) for path, leaf in leaves}
  have, want = shapes(saved), shapes(wanted)
  if have == want:
    return
  only_saved, only_config = sorted(set(have) - set(want)), sorted(set(want) - set(have))
  differ = [k for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  if differ:
    what = f"{differ[0]} is {have[differ[0]]} there, {want[differ[0]]} here ({len(differ)} arrays differ)"
  elif only_saved:
    what = f"it holds {only_saved[0]}, which this config does not ({len(only_saved)} such arrays)"
  else:
    what = f"it lacks {only_config[0]}, which this config has ({len(only_config)} such arrays)"
  raise SanaError(f"checkpoint step {step} in {directory} was saved by a different model or optimizer config: "
                  f"{what}; resume with the run's own config (its config.json) or use a new --workdir")


def _describe(error):
  """The root cause, short: orbax wraps tensorstore's precise message ("OUT_OF_RANGE: ...") in its own."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  return one_line(f"{type(error).__name__}: {text}", 160)


def _chain_text(error):
  parts = []
  while error is not None and len(parts) < 8:
    parts.append(str(error))
    error = error.__cause__ or error.__context__
  return " ".join(parts)


def _outside_the_files(error):
  """True for a read error that is no sign of a damaged checkpoint: moving the step aside would be wrong."""
  if isinstance(error, (PermissionError, MemoryError)):
    return True
  if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM,
                                                    errno.ETIMEDOUT, errno.ESTALE):
    return True
  text = _chain_text(error)
  return any(code in text for code in _NOT_DAMAGE)


def _all_processes(outcome):
  """This process's outcome and every other's, as a list indexed by process."""
  if jax.process_count() == 1:
    return [outcome]
  from jax.experimental import multihost_utils
  return [int(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)]


@contextlib.contextmanager
def _orbax_quiet():
  """Orbax logs (through absl) a warning or a traceback for each step it cannot read, and asyncio its
  abandoned tasks; `restore_latest` says it in one line per step instead."""
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  drop = lambda record: False  # noqa: E731
  for logger in loggers:
    logger.addFilter(drop)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(drop)


_noise_dropped = False


def _drop_abandoned_read_noise():
  """When orbax's restore fails, it closes its event loop with reads still in flight, and each of
  them reports on its own, some well after the restore has returned (how many and when depends on
  the machine's speed): tensorstore's completion callback finds the loop closed and prints
  `RuntimeError: Event loop is closed` through sys.excepthook; the abandoned read coroutines report
  through sys.unraisablehook, their tasks and futures (the read's own error) through asyncio's
  logger. Dozens of tracebacks for one damaged file, which `restore_latest` reports in one line.
  Installed before the first restore, for the life of the process, these filters drop exactly those
  reports and pass everything else on."""
  global _noise_dropped
  if _noise_dropped:
    return
  _noise_dropped = True
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def closed_loop(error):
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

  def unraisable_hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if not ((code is not None and _ORBAX_DIR in code.co_filename) or closed_loop(unraisable.exc_value)):
      previous_unraisable(unraisable)

  def except_hook(kind, error, trace):
    # only a callback entered from native code: its traceback starts in asyncio's call_soon_threadsafe
    from_callback = trace is not None and trace.tb_frame.f_code.co_name == "call_soon_threadsafe"
    if not (from_callback and closed_loop(error)):
      previous_except(kind, error, trace)

  def orbax_read_record(record):
    if "never retrieved" not in record.getMessage():
      return True
    told = record.getMessage() + ("".join(traceback.format_exception(*record.exc_info)) if record.exc_info else "")
    return not any(mark in told for mark in _ABANDONED_READ_MARKS)

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  logging.getLogger("asyncio").addFilter(orbax_read_record)


# grain iterator states are dicts of JSON values, or bytes for some iterators: keep both in JSON
def _encode(data_state):
  if isinstance(data_state, bytes):
    return {"bytes_b64": base64.b64encode(data_state).decode()}
  return {"state": data_state}


def _decode(saved):
  if not isinstance(saved, dict) or not ("bytes_b64" in saved or "state" in saved):
    raise ValueError("its data iterator state is not one this project writes")
  if "bytes_b64" in saved:
    return base64.b64decode(saved["bytes_b64"])
  return saved["state"]
