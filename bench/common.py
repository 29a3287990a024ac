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
