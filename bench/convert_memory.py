"""Peak memory of `python -m sana_jax.convert` on a synthetic Sana-1.6B-shaped original checkpoint (CPU).

  python bench/convert_memory.py                       # 1.6B 1024 px in bf16, converted as stored
  python bench/convert_memory.py --to float32          # the same, widened to float32 (2 safetensors shards)
  python bench/convert_memory.py --diffusers           # and diffusers' from_single_file + save_pretrained after it

Writes an original-layout .pth with the 1.6B model's shapes (20 blocks of width 2240, random bf16
values; torch is used here, to write the file, not by the converter), then converts it in a subprocess
whose anonymous memory (RssAnon: what the process allocated; memory-mapped checkpoint pages are page
cache, not copies) is sampled every 20 ms. Compare its peak with the checkpoint's size: a converter that
held the model would be above it, ours should stay near the interpreter plus one tensor.
"""
import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit  # noqa: E402

GB = 1e9
SANA_1600M = dict(num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, sample_size=32,
                  in_channels=32, out_channels=32)


def write_checkpoint(path):
  """An original-layout .pth of the 1.6B model's shapes (bf16), with pos_embed and y_embedding."""
  import torch
  from flax import nnx

  from sana_jax.convert import diffusers_dit, nvlabs, writing
  from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig
  cfg = SanaTransformerConfig(**SANA_1600M)
  comp = diffusers_dit.component(nnx.eval_shape(lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0))))
  shapes = {name: np.broadcast_to(np.bool_(0), shape) for name, _, shape in writing.specs(comp)}
  original = {name: a.shape for name, a in nvlabs.to_original(shapes, nvlabs.transformer_rows()).items()}
  gen = torch.Generator().manual_seed(0)
  state = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in original.items()}
  state["pos_embed"] = torch.zeros(1, 32 * 32, 2240)
  state["y_embedder.y_embedding"] = torch.zeros(300, 2304)
  torch.save({"state_dict": state}, path)
  return sum(t.numel() * t.element_size() for t in state.values()), max(t.numel() * 4 for t in state.values())


def peak_anonymous_memory(command):
  """(exit status, peak RssAnon bytes, seconds) of a subprocess, sampled."""
  proc = subprocess.Popen(command)
  peak, start = 0, time.perf_counter()

  def sample():
    nonlocal peak
    while proc.poll() is None:
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          for line in f:
            if line.startswith("RssAnon:"):
              peak = max(peak, int(line.split()[1]) * 1024)
      except OSError:
        return
      time.sleep(0.02)

  thread = threading.Thread(target=sample)
  thread.start()
  status = proc.wait()
  thread.join()
  return status, peak, time.perf_counter() - start


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--to", default=None, choices=("float32", "bfloat16", "float16"), help="--dtype of the conversion")
  p.add_argument("--work", default="/tmp/sana-convert-bench")
  p.add_argument("--diffusers", action="store_true", help="also run diffusers' from_single_file + save_pretrained")
  args = p.parse_args()
  os.makedirs(args.work, exist_ok=True)
  pth = os.path.join(args.work, "Sana_1600M_1024px_synthetic.pth")
  start = time.perf_counter()
  size, largest = write_checkpoint(pth)
  written = time.perf_counter() - start
  out = os.path.join(args.work, f"out-{args.to or 'as-stored'}")
  command = [sys.executable, "-m", "sana_jax.convert", pth, "--out", out, "--resolution", "1024"]
  status, peak, seconds = peak_anonymous_memory(command + (["--dtype", args.to] if args.to else []))
  baseline = peak_anonymous_memory([sys.executable, "-c", "import sana_jax.convert.nvlabs"])[1]
  emit(dict(bench="convert_memory", commit=commit(), checkpoint_gb=round(size / GB, 2), to=args.to or "as stored",
            status=status, peak_anon_gb=round(peak / GB, 2), import_only_anon_gb=round(baseline / GB, 2),
            largest_tensor_fp32_gb=round(largest / GB, 3), convert_s=round(seconds, 1),
            write_checkpoint_s=round(written, 1)))
  if args.diffusers:  # diffusers' own single-file path on the same file, given our config.json
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", None: "bfloat16"}[args.to]
    script = (f"import torch, diffusers; m = diffusers.SanaTransformer2DModel.from_single_file({pth!r}, "
              f"config={out!r}, torch_dtype=torch.{dtype}); m.save_pretrained({out + '-diffusers'!r})")
    status, peak, seconds = peak_anonymous_memory([sys.executable, "-c", script])
    emit(dict(bench="convert_memory_diffusers_single_file", commit=commit(), to=dtype, status=status,
              peak_anon_gb=round(peak / GB, 2), convert_s=round(seconds, 1)))


if __name__ == "__main__":
  main()
