"""Condition maps for ControlNets, made from ordinary images (`sample.py --control-type edge`).

The released Sana ControlNets were trained on HED boundary maps (a learned edge detector, soft lines a few
pixels wide) thickened into scribbles; HED's weights cannot be fetched offline, so `edge_map` is a
classical stand-in: Sobel gradients of the blurred luminance, a two-level threshold that keeps weak edges
only where they touch strong ones, and lines thickened to a few pixels, white on black as HED's maps are.
It marks every sharp intensity change (texture and noise included) and misses boundaries between areas of
equal brightness, where HED follows object contours: expect a ControlNet trained on HED to read it less
well than its own maps; a ControlNet trained on these maps (the demo's) reads them as they are.
"""
import numpy as np

from sana_jax.errors import SanaError

_SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)


def _filter(x, kernel):
  """2-D correlation of x [H, W] with a small kernel, edges replicated (same size out)."""
  kh, kw = kernel.shape
  padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
  out = np.zeros_like(x)
  for i in range(kh):
    for j in range(kw):
      out += kernel[i, j] * padded[i:i + x.shape[0], j:j + x.shape[1]]
  return out


def _dilate(mask, radius):
  padded = np.pad(mask, radius)
  out = np.zeros_like(mask)
  for i in range(2 * radius + 1):
    for j in range(2 * radius + 1):
      out |= padded[i:i + mask.shape[0], j:j + mask.shape[1]]
  return out


def edge_map(image, *, low=0.1, high=0.25, thickness=2):
  """An image [H, W, 3] in [0, 1] -> its edge map [H, W, 3] in {0, 1} (float32), white edges on black.

  low / high: gradient magnitudes, as fractions of the image's largest, that a weak edge (kept when it
  touches a strong one) and a strong edge must reach. thickness: the lines' half-width in pixels."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] != 3 or not np.isfinite(image).all():
    raise SanaError(f"edge_map takes an RGB image [H, W, 3] in [0, 1], not an array of shape {image.shape}")
  if not 0 < low <= high < 1 or thickness < 0 or thickness != int(thickness):
    raise SanaError(f"edge_map: expected 0 < low <= high < 1 and a whole thickness >= 0, got {low}, {high}, "
                    f"{thickness}")
  gray = image @ np.array([0.299, 0.587, 0.114], np.float32)
  blur = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
  gray = _filter(gray, blur)
  magnitude = np.hypot(_filter(gray, _SOBEL), _filter(gray, _SOBEL.T))
  top = magnitude.max()
  if top <= 1e-6:  # a flat image has no edges
    return np.zeros_like(image)
  magnitude /= top
  strong, weak = magnitude >= high, magnitude >= low
  edges = strong | (weak & _dilate(strong, 1))
  edges = _dilate(edges, int(thickness)) if thickness else edges
  return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32)
