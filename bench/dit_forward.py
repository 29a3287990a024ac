"""DiT forward: sana-jax (jit) vs diffusers (eager, and torch.compile where it works), same weights.

  python bench/dit_forward.py                      # CPU: medium config (width 384, 4 layers, 32x32, batch 2)
  python bench/dit_forward.py --preset gpu         # GPU: Sana 0.6B / 1.6B at 1024 and 4096, batch 1/2/8, bf16

Prints one JSON line per case; TFLOP/s counts 2 x multiply-accumulates of the matmuls and convs.
"""
import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sana_jax  # noqa: E402
from bench.common import commit, emit, random_reference, time_alternating  # noqa: E402
from sana_jax.models.dit import pure_forward  # noqa: E402

MEDIUM = dict(in_channels=32, out_channels=32, num_attention_heads=12, attention_head_dim=32, num_layers=4,
              num_cross_attention_heads=6, cross_attention_head_dim=64, cross_attention_dim=384,
              caption_channels=2304, mlp_ratio=2.5, sample_size=32)
SANA = {
    "sana_600m": dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
                      cross_attention_head_dim=72, cross_attention_dim=1152),
    "sana_1600m": dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                       cross_attention_head_dim=112, cross_attention_dim=2240),
}
TEXT_LEN = 300


def forward_macs(cfg, batch, tokens, text_len):
  """Multiply-accumulates of one forward pass (matmuls, convs, attention products)."""
  d, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
  inner = cfg["num_cross_attention_heads"] * cfg["cross_attention_head_dim"]
  hidden = int(cfg["mlp_ratio"] * d)
  hd = cfg["attention_head_dim"]
  per_layer = (4 * tokens * d * d                        # q, k, v, out of self-attention
               + 2 * tokens * d * hd + tokens * d        # K^T V, Q (K^T V), Q . sum K
               + tokens * d * inner + 2 * text_len * d * inner + inner * d * tokens  # cross q, k, v, out
               + 2 * tokens * text_len * inner           # QK^T and PV
               + tokens * d * 2 * hidden + tokens * 2 * hidden * 9 + tokens * hidden * d)  # Mix-FFN
  other = tokens * cfg["in_channels"] * d + text_len * (cfg["caption_channels"] * d + d * d) + tokens * d * 32
  return batch * (layers * per_layer + other)


OVERRIDES = {}  # --set key=value: SanaTransformerConfig fields of ours only (e.g. scan_unroll=4)


def build_models(cfg, dtype_name, device, tmp):
  """A random diffusers model (on `device`), saved in the official format and loaded by us."""
  ref = random_reference("SanaTransformer2DModel", cfg, dtype_name, device, tmp)
  return ref, sana_jax.SanaTransformer.from_pretrained(tmp, dtype=getattr(jnp, dtype_name), **OVERRIDES)


def run_model(cfg, name, res, batches, dtype_name, device, repeats, try_compile, profile_dir=None):
  import torch
  latent = res // 32
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours = build_models(cfg, dtype_name, device, tmp)
  tdtype = next(ref.parameters()).dtype
  apply, state = pure_forward(ours)
  fwd = jax.jit(apply)
  compiled_ref = None
  if try_compile:
    try:
      compiled_ref = torch.compile(ref)
    except Exception as e:  # noqa: BLE001 - report and go on without it
      print(f"# torch.compile unavailable: {type(e).__name__}: {e}", file=sys.stderr)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  for batch in batches:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, latent, latent, cfg["in_channels"])).astype(np.float32)
    t = rng.uniform(0, 1000, batch).astype(np.float32)
    y = rng.standard_normal((batch, TEXT_LEN, cfg["caption_channels"])).astype(np.float32)
    mask = np.ones((batch, TEXT_LEN), np.float32)
    mask[:, TEXT_LEN // 3:] = 0
    jargs = [jax.device_put(a) for a in (x, t, y.astype(jnp.dtype(ours.dtype)), mask)]
    run_ours = lambda: fwd(state, *jargs).block_until_ready()
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
    ty = torch.from_numpy(y).to(device, tdtype)
    tt, tm = torch.from_numpy(t).to(device), torch.from_numpy(mask).to(device)

    def torch_runner(model):
      def run():
        with torch.no_grad():
          model(tx, encoder_hidden_states=ty, timestep=tt, encoder_attention_mask=tm, return_dict=False)
        sync()
      return run

    candidates = {"ours": run_ours, "diffusers": torch_runner(ref)}
    if compiled_ref is not None:
      try:
        torch_runner(compiled_ref)()
        candidates["diffusers_compile"] = torch_runner(compiled_ref)
      except Exception as e:  # noqa: BLE001
        print(f"# torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
        compiled_ref = None
    with torch.no_grad():
      theirs = ref(tx, encoder_hidden_states=ty, timestep=tt, encoder_attention_mask=tm, return_dict=False)[0]
    theirs = theirs.float().cpu().numpy().transpose(0, 2, 3, 1)
    mine = np.asarray(fwd(state, *jargs).astype(jnp.float32))
    agreement = float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs))
    times = time_alternating(candidates, repeats)
    flops = 2 * forward_macs(cfg, batch, latent * latent, TEXT_LEN)
    record = dict(bench="dit_forward", model=name, res=res, batch=batch, dtype=dtype_name,
                  device=jax.devices()[0].device_kind, commit=commit(),
                  ours_ms=round(times["ours"] * 1e3, 3), diffusers_ms=round(times["diffusers"] * 1e3, 3),
                  ratio=round(times["ours"] / times["diffusers"], 3),
                  ours_tflops=round(flops / times["ours"] / 1e12, 2),
                  diffusers_tflops=round(flops / times["diffusers"] / 1e12, 2),
                  rel_err_vs_diffusers=float(f"{agreement:.3g}"))
    if "diffusers_compile" in times:
      record.update(diffusers_compile_ms=round(times["diffusers_compile"] * 1e3, 3),
                    ratio_vs_compile=round(times["ours"] / times["diffusers_compile"], 3))
    emit(record)
    if profile_dir:
      top_ops(run_ours, os.path.join(profile_dir, f"{name}_{res}_b{batch}"))
  del ref, compiled_ref
  if device == "cuda":
    torch.cuda.empty_cache()


def top_ops(fn, out_dir, n=40):
  """Profiles three calls of `fn` and prints the device ops that took the most time."""
  import collections
  import glob
  import gzip
  import json
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    for _ in range(3):
      fn()
  trace = json.load(gzip.open(sorted(glob.glob(f"{out_dir}/**/*perfetto_trace.json.gz", recursive=True))[-1]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total = collections.Counter()
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str(e.get("args", {}).get("name", ""))}
  for e in events:
    if e.get("ph") == "X" and (not device_pids or e.get("pid") in device_pids):
      total[e.get("name", "?")] += e.get("dur", 0) / 3
  print(f"#  device total {sum(total.values()) / 1e3:.3f} ms per call", file=sys.stderr)
  for name, us in total.most_common(n):
    print(f"#  {us / 1e3:9.3f} ms  {name[:110]}", file=sys.stderr)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
  p.add_argument("--models", default="sana_600m,sana_1600m")
  p.add_argument("--res", default="1024,4096")
  p.add_argument("--batch", default="1,2,8")
  p.add_argument("--profile", default=None, help="directory: print the top device ops of our forward")
  p.add_argument("--set", action="append", default=[], help="key=value override of our model config")
  args = p.parse_args()
  for item in args.set:
    key, value = item.split("=", 1)
    OVERRIDES[key] = type(getattr(sana_jax.SanaTransformerConfig, key))(value)
  if args.preset == "cpu":
    run_model(MEDIUM, "medium", 1024, [2], "float32", "cpu", args.repeats or 15, not args.no_compile,
              args.profile)
    return
  base = dict(in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5)
  for name in args.models.split(","):
    for res in map(int, args.res.split(",")):
      cfg = dict(base, sample_size=res // 32, **SANA[name])
      if res >= 2048:
        cfg["interpolation_scale"] = {2048: 1.0, 4096: 2.0}[res]
      run_model(cfg, name, res, [int(b) for b in args.batch.split(",")], "bfloat16", "cuda",
                args.repeats or 10, not args.no_compile, args.profile)


if __name__ == "__main__":
  main()
