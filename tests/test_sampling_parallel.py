"""Sampling across devices: batch, sequence (each image's latent rows split over the devices: linear attention's
sums all-reduced, the Mix-FFN's conv halos exchanged) and cfg x sequence plans give the single-device latents
on a 128 x 128 token grid, and the row-split DC-AE decode the single-device image."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_controlnet import controlnet_pipelines  # noqa: F401 - a tiny ControlNet pipeline saved to disk
from test_pipeline import pipelines  # noqa: F401 - the tiny diffusers pipeline saved to disk
from test_sprint import sprint  # noqa: F401 - a tiny Sana-Sprint pipeline saved to disk
from test_train import NEEDS_8

import sana_jax
from bench.sequence_parallel import collectives
from sana_jax import parallel
from sana_jax.errors import SanaError
from sana_jax.training.plan import with_sharding

SIDE = 512  # pixels: 128 x 128 latent tokens of the tiny pipeline (4x DC-AE, patch 1)


@pytest.mark.parametrize("parallelism, call, ways", [
    ("auto", dict(rows=16, groups=2, token_rows=32, tokens=32 * 32), (8, 1)),     # small images: the batch
    ("auto", dict(rows=2, groups=2, token_rows=32, tokens=32 * 32), (1, 1)),      # ... or one device
    ("auto", dict(rows=2, groups=2, token_rows=128, tokens=128 * 128), (2, 4)),   # 4K-like: cfg x sequence
    ("auto", dict(rows=3, groups=3, token_rows=128, tokens=128 * 128), (1, 8)),   # 3 groups: sequence
    ("auto", dict(rows=4, groups=2, token_rows=128, tokens=128 * 128), (4, 2)),   # 2 images: batch x sequence
    ("auto", dict(rows=16, groups=2, token_rows=128, tokens=128 * 128), (8, 1)),  # 8 images: one each
    ("auto", dict(rows=2, groups=2, token_rows=90, tokens=90 * 128), (1, 1)),     # rows do not divide
    ("batch", dict(rows=2, groups=2, token_rows=128, tokens=128 * 128), (1, 1)),
    ("sequence", dict(rows=16, groups=2, token_rows=32, tokens=32 * 32), (1, 8)),
    ("cfg", dict(rows=4, groups=2, token_rows=32, tokens=32 * 32), (2, 4)),
])
def test_sampling_plans(parallelism, call, ways):
  assert parallel.sampling_plan(parallelism, 8, **call) == ways
  assert parallel.sampling_plan(parallelism, 1, **call) == (1, 1)


@pytest.mark.parametrize("parallelism, call, match", [
    ("sequence", dict(rows=2, groups=2, token_rows=36, tokens=36 * 36), "rows divide by 8"),
    ("cfg", dict(rows=1, groups=1, token_rows=32, tokens=32 * 32), "needs guidance"),
    ("cfg", dict(rows=3, groups=3, token_rows=32, tokens=32 * 32), "needs guidance"),
])
def test_impossible_plans_are_one_line_errors(parallelism, call, match):
  with pytest.raises(SanaError, match=match):
    parallel.sampling_plan(parallelism, 8, **call)


def generate(pipe, n, output_type="latent", guidance=4.5):
  latents = np.random.default_rng(0).standard_normal((n, SIDE // 4, SIDE // 4, 8)).astype(np.float32)
  return pipe(["a red fox in the snow", "a blue house"][:n] * (n // 2 or 1), height=SIDE, width=SIDE,
              num_inference_steps=2, guidance_scale=guidance, latents=latents, output_type=output_type,
              use_resolution_binning=False).images


@pytest.fixture(scope="module")
def single(pipelines):  # noqa: F811
  return sana_jax.SanaPipeline.from_pretrained(pipelines[2], devices=1)


@NEEDS_8
@pytest.mark.slow
@pytest.mark.parametrize("parallelism, n, ways", [("sequence", 1, (1, 8)), ("cfg", 2, (2, 4)), ("batch", 4, (8, 1)),
                                                   ("auto", 2, (4, 2))])
def test_plans_give_the_single_device_latents(pipelines, single, parallelism, n, ways):  # noqa: F811
  pipe = sana_jax.SanaPipeline.from_pretrained(pipelines[2], parallelism=parallelism)
  assert pipe.sampling_plan((n, SIDE // 4, SIDE // 4, 8), groups=2) == ways
  np.testing.assert_allclose(np.asarray(generate(pipe, n)), np.asarray(generate(single, n)), rtol=1e-5, atol=1e-5)


@NEEDS_8
@pytest.mark.slow
def test_row_split_decode_gives_the_single_device_image(pipelines, single):  # noqa: F811
  pipe = sana_jax.SanaPipeline.from_pretrained(pipelines[2], parallelism="sequence")
  np.testing.assert_allclose(generate(pipe, 1, "np"), generate(single, 1, "np"), atol=1e-5)


@NEEDS_8
def test_sequence_split_dit_call_needs_an_eighth_of_the_memory_per_device():
  """One model call on 128 x 128 tokens split over 8 devices by rows: per-device scratch close to 1/8 of one
  device's (the Mix-FFN's halos exchanged explicitly; left to the partitioner it was 3.4/8), and the
  collectives of a block are linear attention's all-reduces and the halos' permutes, nothing gathered."""
  from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig
  cfg = SanaTransformerConfig(in_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                              num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                              caption_channels=32, sample_size=32, patch_size=1)
  graph, state = nnx.split(nnx.eval_shape(lambda: SanaTransformer(cfg, rngs=nnx.Rngs(0))))
  inputs = (jax.ShapeDtypeStruct((2, 128, 128, 8), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, 10, 32), jnp.float32), jax.ShapeDtypeStruct((2, 10), jnp.int32))
  call = lambda state, *a: nnx.merge(graph, state)(*a)
  single = jax.jit(call).lower(state, *inputs).compile().memory_analysis().temp_size_in_bytes
  mesh = parallel.make_mesh(data=1, fsdp=8)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def planned(state, *a):
    with parallel.use_mesh(mesh, parallel.SAMPLING_RULES):
      return call(state, *a)
  split = jax.jit(planned).lower(with_sharding(state, replicated), *inputs).compile()
  assert split.memory_analysis().temp_size_in_bytes * 8 < 1.5 * single  # measured: 1.10
  ops = collectives(split)
  assert "all-reduce" in ops and "collective-permute" in ops and "all-gather" not in ops and "all-to-all" not in ops


@pytest.mark.slow
def test_two_processes_sample_as_one_device(pipelines, single, tmp_path):  # noqa: F811
  """sample.py on the 4 CPU devices of each of two processes joined by jax.distributed (a TPU slice's hosts):
  the sequence plan spans all 8, process 0 alone writes, and its image is the one-device image."""
  import subprocess
  import sys

  from conftest import cpu_env
  from PIL import Image
  from test_train import ROOT, free_port
  env = dict(cpu_env(4), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
  cmd = [sys.executable, "sample.py", "a red fox in the snow", "--model", str(pipelines[2]), "--height", str(SIDE),
         "--width", str(SIDE), "--steps", "2", "--cfg", "4.5", "--dtype", "float32", "--parallelism", "sequence",
         "--output-dir", str(tmp_path / "out")]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert "wrote 1 image" in outs[0] and "wrote" not in outs[1]
  assert sorted(os.listdir(tmp_path / "out")) == ["0000.png"]
  from sana_jax.pipeline import prng_key
  latents = jax.random.normal(prng_key(0), (1, SIDE // 4, SIDE // 4, 8))
  want = single("a red fox in the snow", height=SIDE, width=SIDE, num_inference_steps=2, guidance_scale=4.5,
                latents=latents, output_type="np").images[0]
  got = np.asarray(Image.open(tmp_path / "out" / "0000.png"), np.float32) / 255
  assert np.abs(got - want).max() <= 1.5 / 255  # 8-bit rounding


@NEEDS_8
@pytest.mark.slow
def test_sprint_and_controlnet_pipelines_split_by_rows_as_one_device(sprint, controlnet_pipelines):  # noqa: F811
  """The family members run the same plans: Sana-Sprint's sCM loop and the ControlNet's residuals (added to
  row-split tokens) give the one-device latents under the sequence plan."""
  control = np.random.default_rng(1).uniform(size=(1, SIDE, SIDE, 3)).astype(np.float32)
  for root, kwargs in ((sprint[2], dict(guidance_scale=4.5)),
                       (controlnet_pipelines[1], dict(guidance_scale=4.5, control_image=control))):
    pipes = [sana_jax.load_pipeline(root, devices=1), sana_jax.load_pipeline(root, parallelism="sequence")]
    latents = np.random.default_rng(0).standard_normal((1, SIDE // 4, SIDE // 4, 8)).astype(np.float32)
    one, split = (np.asarray(p("a red circle", height=SIDE, width=SIDE, num_inference_steps=2, latents=latents,
                                seed=0, output_type="latent", use_resolution_binning=False, **kwargs).images)
                  for p in pipes)
    assert pipes[1].sampling_plan(latents.shape, groups=2)[1] == 8
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)
