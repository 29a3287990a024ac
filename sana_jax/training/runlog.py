"""Run logs, written by process 0 only: DIR/metrics.jsonl (one JSON object per logged step),
TensorBoard event files under DIR/tensorboard, and a progress bar."""
import json
import os

import jax


class RunLog:

  def __init__(self, workdir, *, total_steps, start_step, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = self.bar = None
    if not self.enabled:
      return
    _drop_lines_after(self.path, start_step)  # a resumed run logs the steps after its checkpoint again
    from tensorboardX import SummaryWriter
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


def _drop_lines_after(path, step):
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
