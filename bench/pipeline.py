"""End to end (prompt -> image): sana-jax SanaPipeline vs diffusers' SanaPipeline on the same weights.

  python bench/pipeline.py                 # CPU: medium pipeline (DiT width 384 x 4 layers, 256 px), 20 steps
Prints one JSON line per batch size: total time and ours' split into text encoding, denoising, decode.
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sana_jax  # noqa: E402
from bench.common import commit, emit, time_alternating  # noqa: E402
from bench.text_encoder import build as build_text  # noqa: E402

TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)
DIT = dict(in_channels=32, out_channels=32, num_attention_heads=12, attention_head_dim=32, num_layers=4,
           num_cross_attention_heads=6, cross_attention_head_dim=64, cross_attention_dim=384, caption_channels=256,
           sample_size=8)
VAE = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
           encoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",) * 4,
           decoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",) * 4,
           encoder_block_out_channels=(16, 32, 64, 64, 128, 128), decoder_block_out_channels=(16, 32, 64, 64, 128, 128),
           encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
           encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
           downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407)


def build(tmp):
  import diffusers
  import torch
  tok, text_pipe, _ = build_text(os.path.join(tmp, "te"), TEXT, "cpu", "float32")
  torch.manual_seed(0)
  ref = diffusers.SanaPipeline(
      tokenizer=tok, text_encoder=text_pipe.text_encoder, transformer=diffusers.SanaTransformer2DModel(**DIT).eval(),
      vae=diffusers.AutoencoderDC(**VAE).eval(),
      scheduler=diffusers.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction"))
  ref.save_pretrained(os.path.join(tmp, "pipe"))
  return ref, sana_jax.SanaPipeline.from_pretrained(os.path.join(tmp, "pipe"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import torch
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours = build(tmp)
  size = 256
  for batch in (1, 4):
    prompts = ["a small red fox jumping over a lazy dog in the snow"] * batch
    latents = np.random.default_rng(0).standard_normal((batch, size // 32, size // 32, 32)).astype(np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    kw = dict(height=size, width=size, num_inference_steps=args.steps, guidance_scale=4.5)

    def theirs():
      with torch.no_grad():
        ref(prompts, latents=t_latents, output_type="np", use_resolution_binning=False, **kw)

    def mine():
      ours(prompts, latents=jnp.asarray(latents), output_type="np", **kw)

    times = time_alternating({"ours": mine, "diffusers": theirs}, args.repeats, warmup=1)
    # ours split into its stages (each synchronised)
    start = time.perf_counter()
    enc = jax.block_until_ready(ours.encode_prompt(prompts))
    t_text = time.perf_counter() - start
    start = time.perf_counter()
    lat = jax.block_until_ready(ours(prompts, latents=jnp.asarray(latents), output_type="latent", **kw).images)
    t_denoise = time.perf_counter() - start - t_text
    start = time.perf_counter()
    jax.block_until_ready(ours.decode(lat))
    t_decode = time.perf_counter() - start
    del enc
    emit(dict(bench="pipeline", model="medium", res=size, batch=batch, steps=args.steps, dtype="float32",
              device=jax.devices()[0].device_kind, commit=commit(), ours_s=round(times["ours"], 3),
              diffusers_s=round(times["diffusers"], 3), ratio=round(times["ours"] / times["diffusers"], 3),
              ours_text_s=round(t_text, 3), ours_denoise_s=round(t_denoise, 3), ours_decode_s=round(t_decode, 3)))


if __name__ == "__main__":
  main()
