"""Train-step time with online encoding (DC-AE + Gemma-2 inside the step, `config.encoders`) against the same
step on latents and embeddings precomputed by the same encoders: same model, images, mesh and batch,
timed alternately in one run.

  python bench/online_encoding.py                        # CPU: the shipped demo pipeline, 64 px
  python bench/online_encoding.py --model Sana_600M_512px_diffusers --resolution 512 --dtype bfloat16 --batch 32

The GPU line needs a Sana 0.6B diffusers directory (or hub id) on the machine. Batches are device-resident:
this measures the steps; the hosts' share of online encoding (tokenizing the captions) is timed apart.
"""
import argparse
import json
import os
import sys
import time

import jax
import ml_collections as mlc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit, time_alternating  # noqa: E402
from configs import tiny  # noqa: E402
from sana_jax import parallel  # noqa: E402
from sana_jax.convert import pipelines  # noqa: E402
from sana_jax.demo.stages import ASSET  # noqa: E402
from sana_jax.training.trainer import Trainer  # noqa: E402


def config_for(model_dir, batch, dtype, online):
  with open(os.path.join(pipelines.component_dir(model_dir, "transformer"), "config.json")) as f:
    model = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "dropout"}
  c = tiny.get_config()
  c.model, c.dtype, c.batch_size, c.ema_decay = mlc.ConfigDict(model), dtype, batch, 0.0
  c.encoders = model_dir if online else ""
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default=ASSET, help="a diffusers-format Sana pipeline directory")
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=32, help="global batch")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  model_dir = pipelines.resolve_model(args.model)
  online = Trainer(config_for(model_dir, args.batch, args.dtype, True), parallel.make_mesh(data=-1))
  stored = Trainer(config_for(model_dir, args.batch, args.dtype, False), online.mesh)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(args.batch, args.resolution, args.resolution, 3)).astype(np.float32)
  words = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a photo of a cat"]
  captions = np.array([words[i % len(words)] for i in range(args.batch)], object)
  start = time.perf_counter()
  online_batch = online.put_batch({"images": images, "captions": captions})
  tokenize_s = time.perf_counter() - start
  encoded = jax.device_get(jax.jit(online.encoders.encode)(online.encoders.params, online_batch))
  stored_batch = stored.put_batch(encoded)
  null = online.null_text(None)
  states = {"online": online.init(), "precomputed": stored.init()}  # the same seed: the same weights

  def runner(name, trainer, batch):
    def run():
      states[name], metrics = trainer.step(states[name], batch, null)
      jax.block_until_ready(metrics)
    return run

  fns = {"online": runner("online", online, online_batch), "precomputed": runner("precomputed", stored, stored_batch)}
  times = time_alternating(fns, args.steps)
  devices = online.mesh.devices.size
  emit(dict(bench="online_encoding", model=os.path.basename(model_dir.rstrip("/")),
            device=jax.devices()[0].device_kind, devices=devices, batch=args.batch, resolution=args.resolution,
            dtype=args.dtype, commit=commit(),
            online_step_ms=round(times["online"] * 1e3, 2), precomputed_step_ms=round(times["precomputed"] * 1e3, 2),
            online_over_precomputed=round(times["online"] / times["precomputed"], 2),
            host_tokenize_ms=round(tokenize_s * 1e3, 1),
            online_images_per_s_per_device=round(args.batch / times["online"] / devices, 1)))


if __name__ == "__main__":
  main()
