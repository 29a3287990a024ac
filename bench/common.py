"""Shared benchmark helpers: timing alternating runs, device names, the commit, JSON lines."""
import json
import os
import statistics
import subprocess
import time


def commit():
  """Short hash of HEAD; SANA_BENCH_COMMIT overrides it where the tree travels without .git."""
  if os.environ.get("SANA_BENCH_COMMIT"):
    return os.environ["SANA_BENCH_COMMIT"]
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                   stderr=subprocess.DEVNULL).strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def time_alternating(fns, repeats, warmup=2):
  """{name: median seconds}, running the candidates in turn so drift hits all of them alike."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def emit(record):
  print(json.dumps(record), flush=True)


def random_reference(cls_name, cfg, dtype_name, device, directory):
  """A seeded random diffusers model `cls_name` built on `device` in `dtype_name`, saved to
  `directory` in the official format (for ours to load the very same weights)."""
  import diffusers
  import torch
  torch.manual_seed(0)
  with torch.device(device):
    ref = getattr(diffusers, cls_name)(**cfg).to(getattr(torch, dtype_name)).eval()
  ref.save_pretrained(directory)
  return ref
