"""ControlNet training with train.py's loop on the tiny diffusers pipeline: the ControlNet starts as the
base's first block with zero projections (so the base's output is unchanged), only its blocks and
projections train, the run resumes exactly, the sharded step equals the single-device one, and the
export loads into diffusers' SanaControlNetModel with our outputs."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import nhwc_to_nchw, rel_err
from test_pipeline import pipelines  # noqa: F401 - the tiny diffusers pipeline saved to disk
from test_train import NEEDS_8, assert_params_close, batch, null_text
from test_train_finetune import finetune_config

import sana_jax
from sana_jax import parallel
from sana_jax.errors import SanaError
from sana_jax.training import loop
from sana_jax.training.export_model import export_transformer
from sana_jax.training.trainer import Trainer


def controlnet_config(root, steps):
  c = finetune_config(root, steps)
  c.controlnet = dict(num_layers=1, conditioning_scale=0.8)
  c.optim.update(lr=3e-2, warmup_steps=0)
  c.checkpoint_every = 2
  c.sample.every = 0
  return c


def control_batch(cfg, seed):
  rows = batch(cfg, seed=seed)
  rows["control"] = np.sign(rows["latents"]) + np.random.default_rng(seed + 100).normal(size=rows["latents"].shape)
  return {k: np.asarray(v, np.float32) if k != "mask" else v for k, v in rows.items()}


def test_the_controlnet_starts_as_the_base_first_blocks_and_leaves_its_output(pipelines):  # noqa: F811
  cfg = controlnet_config(pipelines[2], 2)
  trainer = Trainer(cfg, parallel.make_mesh(data=1, devices=jax.devices()[:1]))
  base = loop.load_init_params(cfg, trainer)
  trainer.set_frozen(base)
  state = trainer.state_from_params(trainer.control.from_base(trainer.frozen))
  assert set(state.params) == {"blocks", "input_block", "controlnet_blocks"}  # the embeddings are the base's
  for a, b in zip(jax.tree.leaves(state.params["blocks"]), jax.tree.leaves(base["blocks"])):
    np.testing.assert_array_equal(a, b[:1])
  rows = control_batch(cfg, 0)
  args = (jnp.asarray(rows["latents"]), jnp.full((len(rows["y"]),), 500.0), jnp.asarray(rows["y"]),
          jnp.asarray(rows["mask"]))
  steered = trainer._predict(state.params, trainer.frozen, *args, jnp.asarray(rows["control"]))
  plain = sana_jax.SanaTransformer.from_pretrained(cfg.init_from)(*args)
  np.testing.assert_allclose(steered, plain, atol=1e-5)


@pytest.mark.slow
def test_controlnet_run_trains_resumes_exactly_and_exports_for_diffusers(pipelines, tmp_path):  # noqa: F811
  root = pipelines[2]
  straight = loop.train(controlnet_config(root, 4), str(tmp_path / "straight"))
  loop.train(controlnet_config(root, 2), str(tmp_path / "resumed"))
  resumed = loop.train(controlnet_config(root, 4), str(tmp_path / "resumed"))  # picks up at step 2
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params = jax.device_get(straight.params)
  assert np.abs(params["controlnet_blocks"]["kernel"]).max() > 0 and np.abs(params["input_block"]["kernel"]).max() > 0

  out = tmp_path / "controlnet"
  assert export_transformer(str(tmp_path / "straight"), str(out)) == 4
  ours = sana_jax.SanaControlNetModel.from_pretrained(out)
  theirs = diffusers.SanaControlNetModel.from_pretrained(out).eval()
  assert theirs.config.num_layers == 1
  cfg = controlnet_config(root, 4)
  rows = control_batch(cfg, 7)
  rows["latents"], rows["control"] = rows["latents"][:, :5], rows["control"][:, :5]  # odd, non-square
  t = np.linspace(50, 950, len(rows["y"])).astype(np.float32)
  mine = ours(jnp.asarray(rows["latents"]), jnp.asarray(t), jnp.asarray(rows["y"]), jnp.asarray(rows["mask"]),
              controlnet_cond=jnp.asarray(rows["control"]), conditioning_scale=0.8)
  with torch.no_grad():
    want = theirs(nhwc_to_nchw(rows["latents"]), encoder_hidden_states=torch.from_numpy(rows["y"]),
                  encoder_attention_mask=torch.from_numpy(rows["mask"]), timestep=torch.from_numpy(t),
                  controlnet_cond=nhwc_to_nchw(rows["control"]), conditioning_scale=0.8)[0]
  assert rel_err(mine, np.stack([s.numpy() for s in want])) < 1e-4
  # the exported embeddings are the base's, untouched
  base = sana_jax.SanaTransformer.from_pretrained(cfg.init_from)
  np.testing.assert_array_equal(ours.patch_embed.kernel[...], base.patch_embed.kernel[...])


@NEEDS_8
@pytest.mark.slow
def test_sharded_controlnet_step_equals_single_device(pipelines):  # noqa: F811
  cfg = controlnet_config(pipelines[2], 2)
  cfg.optim.lr = 3e-3  # Adam-type steps amplify float noise in small gradients: keep them small
  results = []
  for mesh in (parallel.make_mesh(data=1, devices=jax.devices()[:1]), parallel.make_mesh(data=2, fsdp=2, tensor=2)):
    trainer = Trainer(cfg, mesh)
    trainer.set_frozen(loop.load_init_params(cfg, trainer))
    state = trainer.state_from_params(trainer.control.from_base(trainer.frozen))
    losses = []
    for i in range(2):
      state, metrics = trainer.step(state, trainer.put_batch(control_batch(cfg, i)), null_text(cfg))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params), state))
  (losses_1, params_1, _), (losses_8, params_8, state_8) = results
  kernel = state_8.params["blocks"]["attn1"]["to_q"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  assert np.allclose(losses_1, losses_8, rtol=1e-5)
  assert_params_close(params_1, params_8)


@pytest.mark.parametrize("update, match", [
    (dict(controlnet=dict(num_layers=2)), "num_layers=2: expected 1 to 1"),
    (dict(controlnet=dict(num_layers=1, scale=1.0)), "unknown key"),
    (dict(controlnet=dict(num_layers=1), init_from=""), "needs config.init_from"),
    (dict(sample=dict(every=1)), "sample.every with config.controlnet"),
])
def test_bad_controlnet_configs_are_one_line_errors(pipelines, tmp_path, update, match):  # noqa: F811
  c = controlnet_config(pipelines[2], 2)
  for key, value in update.items():
    if isinstance(value, dict):
      c[key].update(value) if key == "sample" else setattr(c, key, value)
    else:
      setattr(c, key, value)
  with pytest.raises(SanaError, match=match):
    loop.train(c, str(tmp_path))
