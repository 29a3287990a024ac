"""Train the Sana DiT.

  python train.py --config configs/tiny.py --workdir /tmp/tiny            # CPU smoke run, seconds per step
  python train.py --config configs/sana_600m.py:res=512 --workdir gs://... --config.batch_size=1024
  python train.py --config configs/tiny.py --workdir DIR --config.total_steps=50 --config.mesh.fsdp=2

A run resumes from the last checkpoint in --workdir. Multi-host: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM / on a TPU pod, where JAX finds them).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  """Flags and the config file; anything wrong with them is one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.get("total_steps")  # a config file that failed to load raises on first use
  except Exception as e:  # noqa: BLE001 - bad flag, config file or override
    cause = e.args[0] if isinstance(e, AttributeError) and e.args else None
    if isinstance(cause, KeyError):  # an override of a key the config does not have
      _fail(f"--config override: the config has no key {str(cause.args[0]).strip(chr(39))!r}")
    _fail(_one_line(e))
  if config is None or not _WORKDIR.value:
    _fail("--config and --workdir are required")
  return rest


def _one_line(error):
  """The first line of a flags error, and its last line where the first only introduces it."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
  first = lines[0]
  if "Failed loading config file" in first:
    return f"cannot load --config: {lines[-1]}"
  return f"{first} {lines[-1]}" if first.endswith(":") and len(lines) > 1 else first


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from sana_jax.errors import SanaError
  from sana_jax.compile_cache import enable_compilation_cache
  from sana_jax.training import distributed, loop
  try:
    distributed.maybe_initialize()
    enable_compilation_cache()
    loop.train(_CONFIG.value, _WORKDIR.value)
  except SanaError as e:
    _fail(e)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
