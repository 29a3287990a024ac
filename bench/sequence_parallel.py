"""Sampling one large image across devices: sequence parallelism (latent rows split), cfg x sequence, and the
row-split DC-AE decode.

  python bench/sequence_parallel.py --memory --simulate 8   # CPU: per-device memory and collectives from the
                                                            # compiled programs, Sana 1.6B at 4096 px, abstract
  python bench/sequence_parallel.py --time                  # GPU/TPU: 20 steps at 4096 px on 1, 2, 4, 8 devices
  python bench/sequence_parallel.py --time --smoke          # the timing path at toy sizes (any machine)

--memory compiles one model call (the CFG pair, float32) and the decode on abstract inputs: single device against
the plans on the simulated devices. The DiT's collectives sit in its scanned block: the counts are per
`scan_unroll` (2) blocks.
--time uses random weights of the released shapes (timing does not depend on their values) and the
pipeline's own plans (parallelism="auto": cfg x sequence at 4K) with the prompt embeddings given.
"""
import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(")


def collectives(compiled):
  return dict(collections.Counter(COLLECTIVE.findall(compiled.as_text())))


def dit_and_vae(res, smoke):
  """(SanaTransformerConfig, DCAEConfig) of Sana 1.6B and DC-AE f32c32 at `res` px (toy sizes with smoke)."""
  from configs import common, dcae
  from sana_jax.models.dcae import DCAEConfig
  from sana_jax.models.dit import SanaTransformerConfig
  model = common.sana_transformer("1600m", res)
  vae = dcae.get_config("name=f32c32-sana").model
  if smoke:
    common.shrink_for_runlocal(model)
    vae.update(encoder_block_out_channels=(8, 8, 16, 16, 32, 32), decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
               attention_head_dim=8)
  return SanaTransformerConfig.from_dict(model.to_dict()), DCAEConfig.from_dict(vae.to_dict())


def memory(args):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sana_jax import parallel
  from sana_jax.models import dcae
  from sana_jax.models.dcae import DCAE
  from sana_jax.models.dit import SanaTransformer
  from sana_jax.training.plan import with_sharding
  # float32: XLA:CPU has no bf16 dots, and the float32 copies of the bf16 weights it makes (hoisted out of the
  # block scan: all 1.6B parameters) would count as temporaries; activations scale the same in either
  n, f32 = len(jax.devices()), jnp.float32
  dit_cfg, vae_cfg = dit_and_vae(args.resolution, args.smoke)
  h = args.resolution // 32
  graph, state = nnx.split(nnx.eval_shape(lambda: SanaTransformer(dit_cfg, rngs=nnx.Rngs(0), dtype=f32,
                                                                  param_dtype=f32)))
  call = lambda state, *a: nnx.merge(graph, state)(*a)

  def dit_inputs(rows):
    return (jax.ShapeDtypeStruct((2, rows, rows, 32), f32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, 300, dit_cfg.caption_channels), f32), jax.ShapeDtypeStruct((2, 300), jnp.int32))

  def replicated(tree, mesh):
    return with_sharding(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def temps(lower):
    """(temp bytes at the image size, the same less a 2n x 2n-token image's: the part that grows with the image,
    without the weight slices and other fixed scratch; the compiled program at the image size)"""
    full, small = lower(h).compile(), lower(2 * n).compile()
    t = full.memory_analysis().temp_size_in_bytes
    return t, t - small.memory_analysis().temp_size_in_bytes, full

  rows = [("DiT call, 1 device", *temps(lambda r: jax.jit(call).lower(state, *dit_inputs(r))))]
  for name, ways in (("sequence", (1, n)), ("cfg x sequence", (2, n // 2))):
    mesh = parallel.make_mesh(data=ways[0], fsdp=ways[1])

    def planned(state, *a, mesh=mesh):
      with parallel.use_mesh(mesh, parallel.SAMPLING_RULES):
        return call(state, *a)
    rows.append((f"DiT call, {name} {ways[0]}x{ways[1]}",
                 *temps(lambda r, mesh=mesh, planned=planned: jax.jit(planned).lower(replicated(state, mesh),
                                                                                      *dit_inputs(r)))))

  vgraph, vstate = nnx.split(nnx.eval_shape(lambda: DCAE(vae_cfg, rngs=nnx.Rngs(0), dtype=f32, param_dtype=f32)))
  z = lambda r: jax.ShapeDtypeStruct((1, r, r, vae_cfg.latent_channels), f32)
  decode = jax.jit(lambda s, z: nnx.merge(vgraph, s).decode(z))
  mesh = parallel.make_mesh(data=-1)
  rows += [("DC-AE decode, 1 device", *temps(lambda r: decode.lower(vstate, z(r)))),
           (f"DC-AE decode, rows over {n}",
            *temps(lambda r: dcae._decode_split.lower(vgraph, mesh, replicated(vstate, mesh), z(r))))]
  print(f"Sana 1.6B / DC-AE f32c32 at {args.resolution} px, float32, {n} devices ({jax.devices()[0].platform})")
  print("| program | temp GiB per device | x N / single | growing with the image: GiB | x N / single | "
        "collectives in the program |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, temp, grown, compiled in rows:
    one = rows[0] if name.startswith("DiT") else rows[-2]
    k = 1 if compiled is one[3] else n
    print(f"| {name} | {temp / 2**30:.2f} | {temp * k / one[1]:.2f} | {grown / 2**30:.2f} | {grown * k / one[2]:.2f} | "
          f"{collectives(compiled) or '-'} |")


def timing(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bench.common import commit, emit
  from sana_jax.convert import pipelines
  from sana_jax.demo.stages import ASSET
  from sana_jax.models.dcae import DCAE
  from sana_jax.models.dit import SanaTransformer
  from sana_jax.pipeline import SanaPipeline
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  res = 2048 if args.smoke else args.resolution  # toy sizes, still split over devices
  dit_cfg, vae_cfg = dit_and_vae(args.resolution, args.smoke)
  parts = pipelines.load_components(ASSET, dtype)  # tokenizer and text encoder: unused with prompt embeddings
  parts.update(transformer=SanaTransformer(dit_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
               vae=DCAE(vae_cfg, rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype))
  rng = np.random.default_rng(0)
  embeds = jnp.asarray(rng.standard_normal((1, 300, dit_cfg.caption_channels)), dtype)
  mask = jnp.ones((1, 300), jnp.int32)
  call = dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds,
              negative_prompt_attention_mask=mask, height=res, width=res, num_inference_steps=args.steps,
              guidance_scale=4.5, seed=0, use_resolution_binning=False)
  counts = [k for k in (1, 2, 4, 8) if k <= len(jax.local_devices())]
  first = None
  for k in counts:
    pipe = SanaPipeline(**parts, devices=k)
    plan = pipe.sampling_plan((1, res // 32, res // 32, 32), groups=2)
    times = {}
    for output in ("latent", "np"):  # denoising alone, then with the decode
      jax.block_until_ready(pipe(**call, output_type=output).images)  # compile
      start = time.perf_counter()
      for _ in range(args.repeats):
        jax.block_until_ready(pipe(**call, output_type=output).images)
      times[output] = (time.perf_counter() - start) / args.repeats
    first = first or times
    emit(dict(bench="sequence_parallel", devices=k, plan=plan, resolution=res, steps=args.steps,
              denoise_s=round(times["latent"], 3), total_s=round(times["np"], 3),
              speedup_denoise=round(first["latent"] / times["latent"], 2),
              speedup_total=round(first["np"] / times["np"], 2), device=jax.devices()[0].device_kind,
              commit=commit()))
    del pipe


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--memory", action="store_true", help="per-device memory and collectives of the compiled programs")
  p.add_argument("--time", action="store_true", help="sampling time on 1, 2, 4, 8 local devices")
  p.add_argument("--simulate", type=int, default=0, help="with --memory on CPU: this many host devices")
  p.add_argument("--resolution", type=int, default=4096)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--smoke", action="store_true", help="toy sizes: checks the script, measures nothing")
  args = p.parse_args()
  if not (args.memory or args.time):
    p.error("give --memory and/or --time")
  if args.simulate:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.simulate}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.memory:
    memory(args)
  if args.time:
    timing(args)


if __name__ == "__main__":
  main()
