"""Train-step throughput: step time, images/s and TFLOP/s per device (matmul and conv FLOPs of the
whole step, forward and backward, counted from its jaxpr).

  python bench/train_step.py                  # CPU: a medium config, float32
  python bench/train_step.py --preset gpu     # Sana 0.6B at 512 px, bf16, precomputed latents/embeddings
  python bench/train_step.py --preset gpu --batch 128 --remat dots
  python bench/train_step.py --compare-diffusers   # + the same model as diffusers' SanaTransformer2DModel
                                                   #   with torch AdamW, timed alternately in this run

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
from bench.common import commit, emit, time_alternating  # noqa: E402
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


def diffusers_step(c, n):
  """The reference's train step on the same shapes: diffusers' SanaTransformer2DModel, flow MSE,
  torch AdamW (torch has no CAME), in the config's dtype, on torch's default device."""
  import diffusers
  import torch
  d = c.data
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
  model_cfg = {k: v for k, v in c.model.to_dict().items() if k not in ("remat", "scan_unroll", "linear_attention_eps",
                                                                       "timestep_scale", "guidance_embeds_scale")}
  model = diffusers.SanaTransformer2DModel(**model_cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x0 = torch.randn(n, d.latent_channels, d.latent_size, d.latent_size, device=device)
  y = torch.randn(n, d.caption_length, d.caption_channels, device=device)
  mask = torch.ones(n, d.caption_length, device=device)

  def step():
    sigma = torch.sigmoid(torch.randn(n, device=device))[:, None, None, None]
    noise = torch.randn_like(x0)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
      pred = model(((1 - sigma) * x0 + sigma * noise), encoder_hidden_states=y, encoder_attention_mask=mask,
                   timestep=sigma.flatten() * 1000).sample
    loss = torch.mean((pred.float() - (noise - x0)) ** 2)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.clip_norm or 1e9)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
  return step


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--batch", type=int, default=None, help="global batch")
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--compare-diffusers", action="store_true", help="time diffusers + torch AdamW alongside")
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
  holder = {"state": trainer.init()}
  macs = count_macs(trainer._step, jax.eval_shape(trainer._init), batch, null, None)

  def ours():
    holder["state"], holder["metrics"] = trainer.step(holder["state"], batch, null)
    jax.block_until_ready(holder["metrics"])

  start = time.perf_counter()
  ours()
  compile_s = time.perf_counter() - start
  fns = {"ours": ours}
  if args.compare_diffusers:
    fns["diffusers"] = diffusers_step(c, n)
  times = time_alternating(fns, args.steps)
  step_s, m = times["ours"], holder["metrics"]

  devices = mesh.devices.size
  kind = jax.devices()[0].device_kind
  record = dict(bench="train_step", preset=args.preset, device=kind, devices=devices, batch=n, dtype=c.dtype,
                remat=c.model.remat, latent=d.latent_size, commit=commit(), compile_s=round(compile_s, 1),
                step_ms=round(step_s * 1e3, 2), images_per_s_per_device=round(n / step_s / devices, 1),
                tflops_per_device=round(2 * macs / step_s / devices / 1e12, 2), loss=float(m["loss"]))
  if args.compare_diffusers:
    record["diffusers_step_ms"] = round(times["diffusers"] * 1e3, 2)
    record["ours_over_diffusers_time"] = round(step_s / times["diffusers"], 2)
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  if peak and c.dtype == "bfloat16":
    record["share_of_bf16_peak"] = round(2 * macs / step_s / devices / peak, 3)
  emit(record)


if __name__ == "__main__":
  main()
