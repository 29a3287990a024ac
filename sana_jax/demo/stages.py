"""What the demo recipes share: stages that resume, and train.py on the shipped DiT's config."""
import json
import os
import subprocess
import sys
import time

from sana_jax import files
from sana_jax.errors import SanaError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSET = os.path.join(ROOT, "sana_jax", "assets", "sana-shapes")


def run_stages(work, report_name, stages, tag, settings=None, stop_after=None):
  """Runs `stages` [(name, fn(out) -> dict)] in order, each writing WORK/name; a stage whose directory and
  report entry exist is skipped, so an interrupted recipe resumes. WORK/report_name (JSON) holds each
  stage's result and seconds, and `settings`; returns it."""
  path = os.path.join(work, report_name)
  report = files.read_json(path, "recipe report") if os.path.exists(path) else {}
  if settings is not None:
    report["settings"] = settings
  for name, run in stages:
    out = os.path.join(work, name)
    if name in report and os.path.exists(out):
      print(f"[{tag}] {name}: done before, skipped", flush=True)
    else:
      print(f"[{tag}] {name} ...", flush=True)
      start = time.time()
      report[name] = dict(run(out), seconds=round(time.time() - start, 1))
      files.write_json(path, report, indent=1)
      print(f"[{tag}] {name}: {json.dumps(report[name])[:400]}", flush=True)
    if name == stop_after:
      break
  return report


def train_demo(out, *, latents, init_from, steps, batch, lr, seed, flags=()):
  """train.py with configs/demo_shapes.py at the shipped DiT's shape (8 layers, position embedding) from
  `init_from`, no EMA or validation, one checkpoint at the end; returns the last logged metrics."""
  config = os.path.join(ROOT, f"configs/demo_shapes.py:latents={latents},init_from={init_from},layers=8,pe,"
                              f"steps={steps},batch={batch},lr={lr}")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, *flags, f"--config.seed={seed}",
         "--config.ema_decay=0.0", "--config.eval.every=0", f"--config.checkpoint_every={steps}",
         "--config.log_every=100", "--workdir", out]
  if subprocess.run(cmd, cwd=ROOT).returncode:
    raise SanaError("train.py failed (its message is above)")
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return dict(last_metrics=[json.loads(line) for line in f][-1])
