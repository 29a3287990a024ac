"""DC-AE encode / decode: sana-jax (jit) vs diffusers on the same weights.

  python bench/dcae.py                    # CPU: medium config, 256x256, batch 1, float32
  python bench/dcae.py --preset gpu       # GPU: f32c32 decode at 1024 and 2048, tiled 4096, bf16

GPU cases run one per subprocess so each peak-memory figure is its own. TFLOP/s counts 2 x the
multiply-accumulates of every conv and matmul in our decode (bench/flops.py walks its jaxpr):
8.36 TFLOP for f32c32 at 1024 px, 33.4 at 2048.
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch; true peaks

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flax import nnx  # noqa: E402

import sana_jax  # noqa: E402
from bench.common import commit, emit, random_reference, time_alternating  # noqa: E402
from bench.flops import count_macs  # noqa: E402

MEDIUM = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
              encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
              decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
              encoder_block_out_channels=(32, 64, 128, 256), decoder_block_out_channels=(32, 64, 128, 256),
              encoder_layers_per_block=(1, 1, 2, 2), decoder_layers_per_block=(1, 1, 2, 2),
              encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
              downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.5)


def build(cfg, dtype_name, device, tmp):
  ref = random_reference("AutoencoderDC", cfg, dtype_name, device, tmp)
  return ref, sana_jax.DCAE.from_pretrained(tmp, dtype=getattr(jnp, dtype_name))


def run_cpu(repeats):
  import torch
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours = build(MEDIUM, "float32", "cpu", tmp)
  rng = np.random.default_rng(0)
  images = np.tanh(rng.standard_normal((1, 256, 256, 3))).astype(np.float32)
  latents = rng.standard_normal((1, 256 // 8, 256 // 8, 32)).astype(np.float32)
  enc, dec = ours._pure("encode"), ours._pure("decode")
  ti, tz = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (images, latents))

  def torch_call(fn, x):
    def run():
      with torch.no_grad():
        fn(x)
    return run

  cases = (("decode", dec, ref.decode, latents, tz), ("encode", enc, ref.encode, images, ti))
  for name, ours_fn, ref_fn, x, tx in cases:
    jx = jnp.asarray(x)
    times = time_alternating({"ours": lambda: ours_fn(jx).block_until_ready(), "diffusers": torch_call(ref_fn, tx)},
                             repeats)
    emit(dict(bench="dcae", op=name, model="medium", size=256, batch=1, dtype="float32", device="cpu",
              commit=commit(), ours_ms=round(times["ours"] * 1e3, 2), diffusers_ms=round(times["diffusers"] * 1e3, 2),
              ratio=round(times["ours"] / times["diffusers"], 3)))


def run_gpu_case(res, repeats):
  """One f32c32 decode case in bf16; tiled (1024 px tiles, stride 896) above 2048 px for both."""
  import torch

  from configs import dcae
  cfg = dcae.get_config("name=f32c32-sana").model.to_dict()
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours = build(cfg, "bfloat16", "cuda", tmp)
  latent = res // 32
  z = np.random.default_rng(0).standard_normal((1, latent, latent, 32)).astype(np.float32)
  jz = jnp.asarray(z, jnp.bfloat16)
  tiled = res > 2048
  if tiled:
    ref.enable_tiling(tile_sample_min_height=1024, tile_sample_min_width=1024, tile_sample_stride_height=896,
                      tile_sample_stride_width=896)
    ours_fn = lambda: ours.tiled_decode(jz, tile=1024, stride=896).block_until_ready()
    flops = None
  else:
    dec = ours._pure("decode")
    ours_fn = lambda: dec(jz).block_until_ready()
    graphdef, state = nnx.split(ours)
    flops = 2 * count_macs(lambda s, x: nnx.merge(graphdef, s).decode(x), state, jz)
  tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to("cuda", torch.bfloat16)

  def run_ref():
    with torch.no_grad():
      ref.decode(tz)
    torch.cuda.synchronize()

  times = time_alternating({"ours": ours_fn, "diffusers": run_ref}, repeats, warmup=1)
  stats = jax.devices()[0].memory_stats() or {}
  record = dict(bench="dcae", op="tiled_decode" if tiled else "decode", model="f32c32-sana", size=res, batch=1,
                dtype="bfloat16", device=jax.devices()[0].device_kind, commit=commit(),
                ours_ms=round(times["ours"] * 1e3, 2), diffusers_ms=round(times["diffusers"] * 1e3, 2),
                ratio=round(times["ours"] / times["diffusers"], 3),
                ours_peak_gb=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                diffusers_peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
  if flops:
    record.update(ours_tflops=round(flops / times["ours"] / 1e12, 1))
  emit(record)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--res", type=int, default=None, help="gpu: run only this size (used per subprocess)")
  p.add_argument("--repeats", type=int, default=None)
  args = p.parse_args()
  if args.preset == "cpu":
    run_cpu(args.repeats or 10)
  elif args.res:
    run_gpu_case(args.res, args.repeats or 5)
  else:
    for res in (1024, 2048, 4096):
      subprocess.run([sys.executable, __file__, "--preset", "gpu", "--res", str(res)], check=False)


if __name__ == "__main__":
  main()
