"""Fine-tuning from a diffusers checkpoint, and the sample images a run writes every N steps."""
import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image
from test_pipeline import pipelines  # noqa: F401 - the tiny diffusers pipeline saved to disk

from configs import tiny
from sana_jax.training import loop


def finetune_config(root, workdir_steps=2):
  with open(os.path.join(root, "transformer", "config.json")) as f:
    model = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "dropout"}
  c = tiny.get_config()
  c.model = mlc.ConfigDict(model)
  c.data.latent_channels, c.data.caption_channels, c.data.latent_size = 8, 32, 4
  c.init_from = os.path.join(root, "transformer")
  c.total_steps, c.checkpoint_every, c.eval.every = workdir_steps, 100, 0
  c.sample.update(every=2, model_dir=str(root), prompts=("a red fox in the snow", "a blue house"), steps=2)
  c.optim.lr = 1e-12  # the weights stay (almost) where the checkpoint put them
  return c


@pytest.mark.slow
def test_finetune_starts_from_the_checkpoint_and_writes_samples(pipelines, tmp_path):  # noqa: F811
  ref, ours, root = pipelines
  c = finetune_config(root)
  state = loop.train(c, str(tmp_path))
  params = jax.device_get(state.params)
  loaded = jax.device_get(jax.tree.leaves(ours._dit_state))
  for a, b in zip(jax.tree.leaves(params), loaded):  # the same tree, in the same leaf order
    np.testing.assert_allclose(a, b, atol=1e-6)
  # and the run exports back to a diffusers transformer directory holding exactly those weights
  from flax import nnx

  import sana_jax
  from sana_jax.training.export_model import export_transformer
  assert export_transformer(str(tmp_path), str(tmp_path / "export")) == 2
  exported = sana_jax.SanaTransformer.from_pretrained(tmp_path / "export")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(exported)))):
    np.testing.assert_array_equal(a, b)
  pngs = sorted(os.listdir(tmp_path / "samples"))
  assert pngs == ["step0000002_0.png", "step0000002_1.png"]
  image = np.asarray(Image.open(tmp_path / "samples" / pngs[0]))
  assert image.shape == (32, 32, 3) and image.std() > 0


def test_finetune_from_a_mismatched_checkpoint_is_a_clear_error(pipelines, tmp_path):  # noqa: F811
  from sana_jax.errors import SanaError
  c = finetune_config(pipelines[2])
  c.model.num_layers = 3
  with pytest.raises(SanaError, match="does not match config.model"):
    loop.train(c, str(tmp_path))
