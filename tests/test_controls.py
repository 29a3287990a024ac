"""Edge maps for ControlNets (sana_jax.controls)."""
import numpy as np
import pytest

import sana_jax
from sana_jax.controls import edge_map


def square(h=40, w=56, top=10, left=14, size=16, value=0.8, background=0.1):
  image = np.full((h, w, 3), background, np.float32)
  image[top:top + size, left:left + size] = value
  return image


def test_edges_follow_the_boundary_and_nothing_else():
  edges = edge_map(square(), thickness=1)[..., 0]
  assert set(np.unique(edges)) == {0.0, 1.0}
  ys, xs = np.nonzero(edges)
  # every edge pixel lies within a few pixels of the square's outline, and the outline is covered
  assert ys.min() >= 10 - 3 and ys.max() <= 25 + 3 and xs.min() >= 14 - 3 and xs.max() <= 29 + 3
  assert edges[10:26, 14:30][4:-4, 4:-4].sum() == 0 and edges[:5].sum() == 0  # flat inside and far outside
  for y, x in ((10, 20), (25, 20), (17, 14), (17, 29)):
    assert edges[y - 2:y + 3, x - 2:x + 3].any(), (y, x)


def test_thickness_widens_and_flat_images_have_none():
  thin, thick = edge_map(square(), thickness=0), edge_map(square(), thickness=3)
  assert thick.sum() > 2 * thin.sum() > 0 and (thick >= thin).all()
  assert edge_map(np.full((8, 8, 3), 0.5, np.float32)).sum() == 0
  # relative to the largest edge (x4 in binary scales every gradient exactly)
  np.testing.assert_array_equal(edge_map(square(value=0.25, background=0)), edge_map(square(value=1, background=0)))


@pytest.mark.parametrize("bad", [np.zeros((8, 8)), np.zeros((8, 8, 4)), np.full((8, 8, 3), np.nan)])
def test_bad_images_are_errors(bad):
  with pytest.raises(sana_jax.SanaError, match="RGB image"):
    edge_map(bad)
