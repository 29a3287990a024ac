"""Train the Sana DiT.

  python train.py --config configs/tiny.py --workdir /tmp/tiny            # CPU smoke run, seconds per step
  python train.py --config configs/sana_600m.py:res=512 --workdir /mnt/runs/s512 --config.batch_size=1024
  python train.py --config configs/tiny.py --workdir DIR --config.total_steps=50 --config.mesh.fsdp=2

A run resumes from the newest checkpoint in --workdir that restores (a damaged one is moved aside to
checkpoints/<step>.corrupt-<n> with a warning). The workdir is a local or mounted directory shared by
all processes. Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run
under SLURM / on a TPU pod, where JAX finds them). SIGTERM saves a checkpoint and exits (preemption).
A bad flag or config value is one line `error: ...` and exit status 2.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sana_jax import errors
from sana_jax.training.plan import flag_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")


def _parse(argv):
  """Flags and the config file. absl parses them before `main` runs, outside `errors.cli_main`, so a
  bad flag, config file or override is reported here, the same way."""
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.get("total_steps")  # a config file that failed to load raises on first use
    if config is None or not _WORKDIR.value:
      raise errors.SanaError("--config and --workdir are required")
  except errors.SanaError as e:
    sys.exit(errors.report(e))
  except Exception as e:  # noqa: BLE001 - a bad flag, config file or override
    sys.exit(errors.report(flag_error(e)))
  return rest


@errors.cli_main
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from sana_jax.training import config_checks
  config, workdir = _CONFIG.value, _WORKDIR.value
  config_checks.check(config, workdir)  # before jax is imported and processes join: a bad value fails at once
  from sana_jax.compile_cache import enable_compilation_cache
  from sana_jax.training import distributed, loop
  distributed.maybe_initialize()
  enable_compilation_cache()
  loop.train(config, workdir)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
