"""Run logs, written by process 0 only: DIR/metrics.jsonl (one JSON object per logged step),
TensorBoard event files under DIR/tensorboard, a progress bar, and warnings on stderr."""
import json
import os
import sys

import jax

from sana_jax import errors, files
from sana_jax.errors import SanaError


def warn(message):
  """errors.warn from process 0 only (every process knows the same thing)."""
  if jax.process_index() == 0:
    errors.warn(message)


def _tensorboard_writer():
  """tensorboardX's SummaryWriter. tensorboardX imports PyTorch whenever it is installed (3 s, only to
  accept torch tensors; we log floats), so the import runs with torch hidden unless it is loaded."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class RunLog:

  def __init__(self, workdir, *, total_steps, start_step, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = self.bar = None
    if not self.enabled:
      return
    _drop_lines_after(self.path, start_step)  # a resumed run logs the steps after its checkpoint again
    SummaryWriter = _tensorboard_writer()
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    from tqdm import tqdm
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

  def write(self, step, metrics):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.tb.add_scalar(key, value, step)
    if "loss" in record:
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

  def advance(self, steps=1):
    if self.enabled:
      self.bar.update(steps)

  def image(self, tag, step, image):
    if self.enabled:
      self.tb.add_image(tag, image, step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self.tb.close()
      self.bar.close()


def _plain(value):
  value = value.item() if hasattr(value, "item") else value
  return value


def _step_of(line):
  """The integer "step" of a metrics line, or None for a line that is not one (torn, foreign, empty)."""
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError):
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if type(step) is int else None


def _drop_lines_after(path, step):
  """Rewrites metrics.jsonl with the lines of steps <= `step` only. Lines that are not metrics records
  (the torn last line of a run killed mid-write, or anything else) are dropped with a warning."""
  if not os.path.lexists(path):
    return
  files.regular_file(path, "metrics log")
  kept, damaged = [], 0
  try:
    with open(path, "rb") as f:
      for line in f:
        if not line.strip():
          continue
        logged = _step_of(line)
        if logged is None:
          damaged += 1
        elif logged <= step:
          kept.append(line.rstrip(b"\r\n") + b"\n")
  except OSError as e:
    raise SanaError(f"cannot read the metrics log {path}: {e.strerror}") from None
  if damaged:
    warn(f"{path}: dropped {damaged} line(s) that are not metrics records (a run killed mid-write leaves a "
         f"torn last line)")
  with files.atomic_write(path) as f:
    f.writelines(kept)
