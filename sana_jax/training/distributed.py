"""Multi-host start-up: `jax.distributed.initialize()` when the run spans several processes."""
import os

import jax

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize():
  """Joins the other processes of this run, if there are any. Returns True when it did.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID all set.
  Detected: a SLURM job with several tasks, or a multi-host TPU slice; JAX reads those itself.
  Must run before anything touches a JAX backend.
  """
  env = os.environ
  if all(env.get(k) for k in _EXPLICIT):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    return True
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
  if slurm or tpu_pod:
    jax.distributed.initialize()
    return True
  return False
