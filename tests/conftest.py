"""Test setup: 8 simulated CPU devices for the sharding tests (must precede the first jax import)."""
import os
import sys
import tempfile

# XLA's CPU backend at optimisation level 0: the suite's time is mostly compiling many small programs
# (random initialisers above all), which this roughly halves; results are checked against the
# references with the same tolerances, and compiled code runs about half as fast, which tiny models
# do not feel
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# one persistent compilation cache per test session, shared with the train.py / sample.py subprocesses
# the tests start: the same tiny programs compile once
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sana-jax-test-xla-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# `configs/` and the test helpers import by path, as `python train.py --config configs/...` will.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]


def cpu_env(devices):
  """The environment for a subprocess that sees `devices` simulated CPU devices."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
              JAX_PLATFORMS="cpu")
