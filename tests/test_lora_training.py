"""LoRA training with train.py's loop on the tiny diffusers pipeline: only the factors train and are
checkpointed, the run resumes exactly, the sharded step equals the single-device one, and the export
loads into diffusers with the same images as ours."""
import diffusers
import jax
import numpy as np
import pytest
from test_lora import compare
from test_pipeline import pipelines  # noqa: F401 - the tiny diffusers pipeline saved to disk
from test_train import NEEDS_8, batch, null_text
from test_train_finetune import finetune_config

import sana_jax
from sana_jax import parallel
from sana_jax.errors import SanaError
from sana_jax.training import loop
from sana_jax.training.export_model import export_lora, export_transformer
from sana_jax.training.trainer import Trainer

TARGETS = ("to_q", "to_v", "conv_inverted", "attn2.to_out.0", "time_embed.linear")


def lora_config(root, steps):
  c = finetune_config(root, steps)
  c.lora.update(rank=4, alpha=8.0, targets=TARGETS)
  c.optim.update(lr=3e-2, warmup_steps=0)
  c.checkpoint_every = 2
  c.sample.every = steps  # previews from the adapted model
  return c


@pytest.mark.slow
def test_lora_run_trains_only_the_factors_resumes_exactly_and_exports_for_diffusers(pipelines, tmp_path):  # noqa: F811
  ref, _, root = pipelines
  straight = loop.train(lora_config(root, 4), str(tmp_path / "straight"))
  loop.train(lora_config(root, 2), str(tmp_path / "resumed"))
  resumed = loop.train(lora_config(root, 4), str(tmp_path / "resumed"))  # picks up at step 2
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  flat = jax.tree_util.tree_flatten_with_path(straight.params)[0]
  assert {path[-1].key for path, _ in flat} == {"down", "up"}  # the params are the factors alone
  modules = {tuple(k.key for k in path[:-2]) for path, _ in flat}
  assert modules == {("blocks", "attn1", "to_q"), ("blocks", "attn1", "to_v"), ("blocks", "attn2", "to_q"),
                     ("blocks", "attn2", "to_v"), ("blocks", "attn2", "to_out"), ("blocks", "ff", "conv_inverted"),
                     ("time_embed", "linear")}
  assert all(np.abs(np.asarray(a)).max() > 0 for path, a in flat if path[-1].key == "up")  # they trained
  lora_size = sum(a.size for _, a in flat)
  base_size = sum(a.size for a in jax.tree.leaves(pipelines[1]._dit_state))
  state_size = sum(np.size(a) for a in jax.tree.leaves(straight))  # what the checkpoint holds
  assert state_size < 5 * lora_size < base_size

  out = tmp_path / "lora"
  assert export_lora(str(tmp_path / "straight"), str(out)) == 4
  assert (out / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777 == 0o644  # readable as other outputs
  ours = sana_jax.SanaPipeline.from_pretrained(root)
  ours.load_lora_weights(str(out))
  theirs = diffusers.SanaPipeline.from_pretrained(root)
  theirs.load_lora_weights(str(out))
  assert compare(theirs, ours) < 1e-4
  assert compare(ref, ours) > 1e-3  # and the adapter changes the images
  # exported without --lora: the adapter fused into the init_from weights, the same images again
  export_transformer(str(tmp_path / "straight"), str(tmp_path / "fused"))
  fused = sana_jax.SanaPipeline.from_pretrained(root)
  fused.set_transformer_params(_state(tmp_path / "fused"))
  assert compare(theirs, fused) < 1e-4


def _state(directory):
  from flax import nnx
  return nnx.state(sana_jax.SanaTransformer.from_pretrained(directory))


@NEEDS_8
@pytest.mark.slow
def test_sharded_lora_step_equals_single_device(pipelines):  # noqa: F811
  root = pipelines[2]
  cfg = lora_config(root, 2)
  cfg.optim.lr = 3e-3  # Adam-type steps amplify float noise in small gradients: keep them small
  results = []
  for mesh in (parallel.make_mesh(data=1, devices=jax.devices()[:1]), parallel.make_mesh(data=2, fsdp=2, tensor=2)):
    trainer = Trainer(cfg, mesh)
    trainer.set_frozen(loop.load_init_params(cfg, trainer))
    state = trainer.init()
    losses = []
    for i in range(2):
      state, metrics = trainer.step(state, trainer.put_batch(batch(cfg, seed=i)), null_text(cfg))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params), state))
  (losses_1, params_1, _), (losses_8, params_8, state_8) = results
  up = state_8.params["blocks"]["attn1"]["to_q"]["kernel"]["up"]
  assert len(up.sharding.device_set) == 8 and not up.sharding.is_fully_replicated  # sharded like its kernel
  assert np.allclose(losses_1, losses_8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("update, match", [
    (dict(targets=("conv_depth",)), "conv_depth.*not a linear"),
    (dict(targets=("to_qq",)), "to_qq.*names no layer"),
    (dict(dropout=0.1), "dropout"),
    (dict(rank=-1), "config.lora.rank"),
])
def test_bad_lora_configs_are_one_line_errors(pipelines, tmp_path, update, match):  # noqa: F811
  c = lora_config(pipelines[2], 2)
  c.lora.update(update)
  with pytest.raises(SanaError, match=match):
    loop.train(c, str(tmp_path))
