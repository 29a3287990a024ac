"""Orbax checkpoints of a run: the train state, the data iterator's position and the resolved config.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when the
save is complete), so a run killed mid-save resumes from the last complete checkpoint. Every process
takes part in saving and restoring; the state is restored straight onto the current mesh, whatever
mesh it was saved from.
"""
import base64
import json
import os

import orbax.checkpoint as ocp

from sana_jax.training.trainer import TrainState

_FIELDS = ("step", "params", "opt_state", "ema", "nonfinite", "skipped")


class Checkpointer:

  def __init__(self, workdir, *, keep=3, async_save=True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, config):
    """Starts an asynchronous save; returns at once (the next save or `wait` joins it)."""
    items = dict(state=ocp.args.StandardSave(_as_dict(state)), data=ocp.args.JsonSave(_encode(data_state)),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, step=None):
    """(train state placed as `abstract_state`'s shardings say, data iterator state) of `step` (latest)."""
    step = self.latest_step() if step is None else step
    items = dict(state=ocp.args.StandardRestore(_as_dict(abstract_state)), data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return TrainState(**restored["state"]), _decode(restored["data"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _as_dict(state):
  return {name: getattr(state, name) for name in _FIELDS}


# grain iterator states are dicts of JSON values, or bytes for some iterators: keep both in JSON
def _encode(data_state):
  if isinstance(data_state, bytes):
    return {"bytes_b64": base64.b64encode(data_state).decode()}
  return {"state": data_state}


def _decode(saved):
  if "bytes_b64" in saved:
    return base64.b64decode(saved["bytes_b64"])
  return saved["state"]
