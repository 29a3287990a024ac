"""Train-step throughput: step time, images/s and TFLOP/s per device (matmul and conv FLOPs of the
whole step, forward and backward, counted from its jaxpr).

  python bench/train_step.py                  # CPU: a medium config, float32
  python bench/train_step.py --preset gpu     # Sana 0.6B at 512 px, bf16, precomputed latents/embeddings
  python bench/train_step.py --preset gpu --batch 128 --remat dots

Data is device-resident random latents and embeddings of the real shapes: this measures the step,
not the input pipeline.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit  # noqa: E402
from bench.flops import count_macs  # noqa: E402
from configs import common, tiny  # noqa: E402
from sana_jax import parallel  # noqa: E402
from sana_jax.training.trainer import Trainer  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense, SXM datasheet


def config_for(preset, batch, remat):
  if preset == "gpu":
    c = common.sana_config("600m", f"res=512,batch={batch or 64},remat={remat}")
    c.optim.lr_scaling = None
  else:
    c = tiny.get_config()
    c.model.num_layers, c.model.num_attention_heads = 4, 4
    c.model.cross_attention_dim = 128
    c.data.latent_size, c.batch_size = 16, batch or 8
  c.ema_decay = 0.0
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--batch", type=int, default=None, help="global batch")
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  c = config_for(args.preset, args.batch, args.remat)
  mesh = parallel.mesh_from_config(c.mesh)
  trainer = Trainer(c, mesh)
  d, n = c.data, c.batch_size
  rng = np.random.default_rng(0)
  batch = trainer.put_batch(dict(
      latents=rng.normal(size=(n, d.latent_size, d.latent_size, d.latent_channels)).astype(np.float32),
      y=rng.normal(size=(n, d.caption_length, d.caption_channels)).astype(np.float32),
      mask=np.ones((n, d.caption_length), np.int32)))
  null = (np.zeros((d.caption_length, d.caption_channels), np.float32), np.ones(d.caption_length, np.int32))
  state = trainer.init()
  macs = count_macs(trainer._step, jax.eval_shape(trainer._init), batch, null)

  start = time.perf_counter()
  state, m = trainer.step(state, batch, null)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, m = trainer.step(state, batch, null)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, m = trainer.step(state, batch, null)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - start) / args.steps

  devices = mesh.devices.size
  kind = jax.devices()[0].device_kind
  record = dict(bench="train_step", preset=args.preset, device=kind, devices=devices, batch=n, dtype=c.dtype,
                remat=c.model.remat, latent=d.latent_size, commit=commit(), compile_s=round(compile_s, 1),
                step_ms=round(step_s * 1e3, 2), images_per_s_per_device=round(n / step_s / devices, 1),
                tflops_per_device=round(2 * macs / step_s / devices / 1e12, 2), loss=float(m["loss"]))
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  if peak and c.dtype == "bfloat16":
    record["share_of_bf16_peak"] = round(2 * macs / step_s / devices / peak, 3)
  emit(record)


if __name__ == "__main__":
  main()
