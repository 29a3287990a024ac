"""Expands a sweep file into train.py runs: run them one after another here, or print the commands
for a cluster scheduler.

  python -m sana_jax.training.sweep configs/sweeps/tiny_lr.py --workdir /tmp/sweep          # run in sequence
  python -m sana_jax.training.sweep configs/sweeps/tiny_lr.py --workdir gs://b/sweep --print

A sweep file names a base config and returns the runs as override dicts:

  BASE = "configs/sana_600m.py:res=512"
  def get_sweep():
    return [{"optim.lr": lr, "objective.logit_std": std} for lr in (1e-4, 2e-4) for std in (1.0, 1.3)]
"""
import importlib.util
import itertools
import os
import shlex
import subprocess
import sys

from sana_jax import errors, files
from sana_jax.errors import SanaError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def product(**axes):
  """All combinations of several swept keys: product(**{"optim.lr": [1e-4, 2e-4], "seed": [0, 1]})."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def load(path):
  """(BASE, [override dicts]) of a sweep file; anything wrong with the file is a SanaError naming it."""
  files.regular_file(path, "sweep file")
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "BASE") or not hasattr(module, "get_sweep"):
      raise SanaError(f"{path}: a sweep file defines BASE (a config path[:arg]) and get_sweep()")
    runs = list(module.get_sweep())
  except SanaError:
    raise
  except Exception as e:  # noqa: BLE001 - the sweep file is the user's code: its error is theirs to fix
    raise SanaError(f"sweep file {path} failed: {type(e).__name__}: {e}") from None
  if not runs or not all(isinstance(r, dict) for r in runs):
    raise SanaError(f"{path}: get_sweep() must return a non-empty list of override dicts")
  if not isinstance(module.BASE, str) or not module.BASE:
    raise SanaError(f"{path}: BASE must be a config path[:arg], got {errors.short(module.BASE)}")
  return module.BASE, runs


def run_name(overrides):
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


def commands(base, runs, workdir, python=sys.executable):
  out = []
  for overrides in runs:
    cmd = [python, os.path.join(ROOT, "train.py"), "--config", base, "--workdir",
           os.path.join(workdir, run_name(overrides))]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    out.append(cmd)
  return out


def run(cmd):
  """Runs one train.py to its end; if this process is stopped (SIGTERM, Ctrl-C), the run gets SIGTERM
  first (train.py saves a checkpoint and exits) and is waited for, so no run is left orphaned."""
  proc = subprocess.Popen(cmd, cwd=ROOT)
  try:
    return proc.wait()
  finally:
    if proc.poll() is None:
      proc.terminate()
      proc.wait()


@errors.cli_main
def main(argv=None):
  p = errors.ArgumentParser(description="Expand a sweep file into train.py runs.")
  p.add_argument("sweep")
  p.add_argument("--workdir", required=True, help="each run writes to WORKDIR/<its overrides>")
  p.add_argument("--print", action="store_true", help="print the commands instead of running them")
  args = p.parse_args(argv)
  base, runs = load(args.sweep)
  cmds = commands(base, runs, args.workdir)
  if args.print:
    print("\n".join(shlex.join(c) for c in cmds))
    return 0
  for i, cmd in enumerate(cmds):
    print(f"[{i + 1}/{len(cmds)}] {shlex.join(cmd)}", flush=True)
    code = run(cmd)
    if code:  # the run printed its own error; its status is passed on
      errors.report(f"run {i + 1} exited with status {code}; later runs not started")
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
