"""Per-device memory of a LoRA train step from the compiled program, on abstract inputs (no weights, no
data): XLA's memory analysis of the whole jitted step (arguments, outputs, temporaries).

  python bench/lora_memory.py                                   # Sana 1.6B, 1024 px, rank 16, remat full
  python bench/lora_memory.py --size 600m --res 512 --batch 8 --remat dots --rank 32
  python bench/lora_memory.py --full                            # the same step fine-tuning every weight

Compiles for the default backend: run it on the GPU/TPU whose memory is in question (buffer assignment
differs by backend; on CPU it is an estimate of the same program).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit  # noqa: E402
from configs import common  # noqa: E402
from sana_jax import parallel  # noqa: E402
from sana_jax.training.trainer import Trainer  # noqa: E402

GB = 1e9


def abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def nbytes(tree):
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="1600m", choices=("600m", "1600m"))
  p.add_argument("--res", type=int, default=1024)
  p.add_argument("--batch", type=int, default=1, help="per-device batch")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
  p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated LoRA targets")
  p.add_argument("--full", action="store_true", help="full fine-tuning instead (no LoRA)")
  a = p.parse_args()
  c = common.sana_config(a.size, f"res={a.res},batch={a.batch},remat={a.remat}")
  c.ema_decay = 0.0
  if not a.full:
    c.lora.update(rank=a.rank, alpha=float(a.rank), targets=tuple(a.targets.split(",")))
  mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  trainer = Trainer(c, mesh)
  d = c.data
  shapes = dict(latents=((a.batch, d.latent_size, d.latent_size, d.latent_channels), jnp.float32),
                y=((a.batch, d.caption_length, d.caption_channels), jnp.float32),
                mask=((a.batch, d.caption_length), jnp.int32))
  batch = {k: jax.ShapeDtypeStruct(s, t, sharding=trainer.batch_shardings[k]) for k, (s, t) in shapes.items()}
  null = (jax.ShapeDtypeStruct((d.caption_length, d.caption_channels), jnp.float32),
          jax.ShapeDtypeStruct((d.caption_length,), jnp.int32))
  state = trainer.abstract_state()
  frozen = None if trainer.lora is None else abstract(trainer.base_abstract, trainer.base_shardings)
  began = time.perf_counter()
  compiled = trainer._jit_step.lower(state, batch, null, frozen).compile()
  seconds = time.perf_counter() - began
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  emit(dict(
      bench="lora_memory", commit=commit(), device=jax.devices()[0].device_kind, model=a.size, res=a.res,
      batch_per_device=a.batch, remat=a.remat, lora_rank=None if a.full else a.rank,
      lora_targets=None if a.full else a.targets, compute_dtype=c.dtype,
      trained_params_gb=round(nbytes(state.params) / GB, 3), optimizer_state_gb=round(nbytes(state.opt_state) / GB, 3),
      frozen_base_gb=round(nbytes(frozen) / GB, 3) if frozen is not None else 0.0,
      arguments_gb=round(m.argument_size_in_bytes / GB, 3), outputs_gb=round(m.output_size_in_bytes / GB, 3),
      aliased_gb=round(m.alias_size_in_bytes / GB, 3), temporaries_gb=round(m.temp_size_in_bytes / GB, 3),
      peak_gb=round(peak / GB, 3), compile_seconds=round(seconds, 1)))


if __name__ == "__main__":
  main()
