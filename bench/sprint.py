"""Sana-Sprint end to end (prompt -> image): sana-jax SanaSprintPipeline, against diffusers' on CPU.

  python bench/sprint.py                  # CPU: medium Sprint pipeline (DiT width 384 x 4 layers, 256 px),
                                          #      2 steps, ours vs diffusers' SanaSprintPipeline, same weights
  python bench/sprint.py --preset gpu     # GPU: Sprint 1.6B shapes at 1024 px (random weights: Gemma-2-2B,
                                          #      f32c32 DC-AE), 1/2/4 steps, batch 1 and 8, bf16, ours alone

Prints one JSON line per case: end-to-end seconds (text encoding, the steps, decode, images as
arrays) and, for ours, the split into text encoding, sampling and decode. The paper's figure for
the GPU preset is about 0.1 s at 1 step on an H100.
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import commit, emit, time_alternating  # noqa: E402
from bench.pipeline import DIT, TEXT, VAE  # noqa: E402

PROMPT = "a small red fox jumping over a lazy dog in the snow"


def build_cpu(tmp):
  """diffusers' SanaSprintPipeline of bench/pipeline.py's medium shapes (with Sprint's guidance
  embedding and q/k norms), saved and loaded by ours."""
  import diffusers
  import torch

  import sana_jax
  from bench.text_encoder import build as build_text
  tok, text_pipe, _ = build_text(os.path.join(tmp, "te"), TEXT, "cpu", "float32")
  torch.manual_seed(0)
  dit = diffusers.SanaTransformer2DModel(**DIT, guidance_embeds=True, qk_norm="rms_norm_across_heads").eval()
  ref = diffusers.SanaSprintPipeline(tokenizer=tok, text_encoder=text_pipe.text_encoder, transformer=dit,
                                     vae=diffusers.AutoencoderDC(**VAE).eval(), scheduler=diffusers.SCMScheduler())
  ref.save_pretrained(os.path.join(tmp, "pipe"))
  return ref, sana_jax.load_pipeline(os.path.join(tmp, "pipe"))


def run_cpu(repeats, steps):
  import torch
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours = build_cpu(tmp)
  size, channels = 256, DIT["in_channels"]
  for batch in (1, 4):
    prompts = [PROMPT] * batch
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, size // 32, size // 32, channels)).astype(np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=4.5)

    def theirs():
      with torch.no_grad():
        ref(prompts, latents=t_latents, output_type="np", use_resolution_binning=False,
            intermediate_timesteps=1.3 if steps == 2 else None, **kw)

    def mine():
      ours(prompts, latents=latents, seed=0, output_type="np", **kw)

    times = time_alternating({"ours": mine, "diffusers": theirs}, repeats, warmup=1)
    emit(dict(bench="sprint", model="medium", res=size, batch=batch, steps=steps, dtype="float32",
              device=jax.devices()[0].device_kind, commit=commit(), ours_s=round(times["ours"], 3),
              diffusers_s=round(times["diffusers"], 3), ratio=round(times["ours"] / times["diffusers"], 3),
              **stages(ours, prompts, latents, kw)))


def stages(ours, prompts, latents, kw):
  """Ours split into text encoding, sampling (with its own encoding subtracted) and decode."""
  start = time.perf_counter()
  jax.block_until_ready(ours.encode_prompt(prompts))
  t_text = time.perf_counter() - start
  start = time.perf_counter()
  lat = jax.block_until_ready(ours(prompts, latents=latents, seed=0, output_type="latent", **kw).images)
  t_sample = time.perf_counter() - start - t_text
  start = time.perf_counter()
  jax.block_until_ready(ours.decode(lat))
  return dict(ours_text_s=round(t_text, 4), ours_sample_s=round(t_sample, 4),
              ours_decode_s=round(time.perf_counter() - start, 4))


def build_gpu(dtype):
  """Sprint 1.6B at 1024 px with random weights, built straight onto the device (no files)."""
  from flax import nnx

  from bench.text_encoder import GEMMA_2B, tokenizer
  from configs import dcae, sana_sprint_1600m
  from sana_jax.models import initialized
  from sana_jax.models.dcae import DCAE, DCAEConfig
  from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig
  from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder
  from sana_jax.sprint import SanaSprintPipeline
  tok = tokenizer()
  kw = dict(dtype=dtype, param_dtype=dtype)
  text_config = GemmaConfig(vocab_size=len(tok), **GEMMA_2B)
  dit_config = SanaTransformerConfig.from_dict(sana_sprint_1600m.get_config("res=1024").model.to_dict())
  vae_config = DCAEConfig.from_dict(dcae.get_config("name=f32c32-sana").model.to_dict())
  text = initialized(lambda: GemmaTextEncoder(text_config, rngs=nnx.Rngs(0), **kw))
  dit = initialized(lambda: SanaTransformer(dit_config, rngs=nnx.Rngs(1), **kw))
  vae = initialized(lambda: DCAE(vae_config, rngs=nnx.Rngs(2), **kw))
  return SanaSprintPipeline(tok, text, dit, vae)


def run_gpu(repeats):
  ours = build_gpu(jnp.bfloat16)
  size, channels = 1024, 32
  for batch in (1, 8):
    prompts = [PROMPT] * batch
    latents = np.random.default_rng(0).standard_normal((batch, size // 32, size // 32, channels)).astype(np.float32)
    for steps in (1, 2, 4):
      kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=4.5)
      times = time_alternating({"ours": lambda: ours(prompts, latents=latents, seed=0, output_type="np", **kw)},
                               repeats, warmup=1)
      stats = jax.devices()[0].memory_stats() or {}
      emit(dict(bench="sprint", model="sprint_1600m_random", res=size, batch=batch, steps=steps, dtype="bfloat16",
                device=jax.devices()[0].device_kind, commit=commit(), ours_s=round(times["ours"], 4),
                images_per_s=round(batch / times["ours"], 2),
                ours_peak_gb=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2), **stages(ours, prompts, latents, kw)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--steps", type=int, default=2, help="cpu: sampling steps")
  p.add_argument("--repeats", type=int, default=None)
  args = p.parse_args()
  if args.preset == "cpu":
    run_cpu(args.repeats or 5, args.steps)
  else:
    run_gpu(args.repeats or 10)


if __name__ == "__main__":
  main()
