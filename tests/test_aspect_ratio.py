"""Aspect-ratio bins and the resize-and-crop back, against diffusers' tables and image processor."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN
from reference import rel_err

from sana_jax import aspect_ratio

TABLES = {512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN, 2048: ASPECT_RATIO_2048_BIN,
          4096: ASPECT_RATIO_4096_BIN}


@pytest.mark.parametrize("res", sorted(TABLES))
def test_tables_and_choice_match_diffusers(res):
  ours = aspect_ratio.bins(res)
  assert ours == {k: (int(h), int(w)) for k, (h, w) in TABLES[res].items()}
  for h, w in [(1024, 1024), (720, 1280), (1280, 720), (512, 2048), (300, 4000), (4096, 1024), (999, 1001)]:
    assert aspect_ratio.closest_bin(h, w, ours) == PixArtImageProcessor.classify_height_width_bin(h, w, TABLES[res])


@pytest.mark.parametrize("size", [(416, 608), (96, 64), (64, 96)])
def test_resize_and_crop_matches_diffusers(size):
  images = np.random.default_rng(0).uniform(-1, 1, (2, 104, 152, 3)).astype(np.float32)
  expected = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                                         size[1], size[0]).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(aspect_ratio.resize_and_crop(jnp.asarray(images), *size))
  assert got.shape == expected.shape == (2, *size, 3)
  assert rel_err(got, expected) <= 1e-5
