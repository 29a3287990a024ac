"""Aspect-ratio bins: each requested size is generated at the trained bin of the nearest aspect ratio,
then resized (bilinear) and centre-cropped back, as diffusers' SanaPipeline does.

The 1024 px table (heights and widths in units of 64 px) scales to 512 (x0.5), 2048 (x2) and 4096
(x4); 2048 and 4096 add seven more extreme ratios.
"""
import jax
import jax.numpy as jnp

_BASE_1024 = {  # ratio: (height, width) / 64 px
    "0.25": (8, 32), "0.28": (8, 29), "0.32": (9, 28), "0.33": (9, 27), "0.35": (9, 26), "0.4": (10, 25),
    "0.42": (10, 24), "0.48": (11, 23), "0.5": (11, 22), "0.52": (11, 21), "0.57": (12, 21), "0.6": (12, 20),
    "0.68": (13, 19), "0.72": (13, 18), "0.78": (14, 18), "0.82": (14, 17), "0.88": (15, 17), "0.94": (15, 16),
    "1.0": (16, 16), "1.07": (16, 15), "1.13": (17, 15), "1.21": (17, 14), "1.29": (18, 14), "1.38": (18, 13),
    "1.46": (19, 13), "1.67": (20, 12), "1.75": (21, 12), "2.0": (22, 11), "2.09": (23, 11), "2.4": (24, 10),
    "2.5": (25, 10), "3.0": (27, 9), "4.0": (32, 8),
}
_EXTRA_2048 = {  # ratio: (height, width) / 128 px
    "0.26": (8, 31), "0.27": (8, 30), "2.89": (26, 9), "3.11": (28, 9), "3.62": (29, 8), "3.75": (30, 8),
    "3.88": (31, 8),
}
# diffusers picks the table from the transformer's sample_size (latent side at the trained resolution)
TABLE_FOR_SAMPLE_SIZE = {16: 512, 32: 1024, 64: 2048, 128: 4096}


def bins(resolution):
  """{ratio string: (height, width)} for a trained resolution of 512, 1024, 2048 or 4096 px."""
  scale = resolution / 1024
  table = {r: (int(h * 64 * scale), int(w * 64 * scale)) for r, (h, w) in _BASE_1024.items()}
  if resolution >= 2048:
    table.update({r: (int(h * 128 * scale / 2), int(w * 128 * scale / 2)) for r, (h, w) in _EXTRA_2048.items()})
  return table


def closest_bin(height, width, table):
  """The (height, width) of the bin whose ratio is nearest height / width."""
  ratio = height / width
  key = min(table, key=lambda r: abs(float(r) - ratio))
  return table[key]


def resize_and_crop(images, height, width):
  """NHWC images scaled (bilinear, no antialiasing, half-pixel centres) to cover height x width,
  then centre-cropped to it."""
  h, w = images.shape[1], images.shape[2]
  if (h, w) == (height, width):
    return images
  scale = max(height / h, width / w)
  rh, rw = int(h * scale), int(w * scale)
  images = jax.image.resize(images.astype(jnp.float32), (images.shape[0], rh, rw, images.shape[3]), "linear",
                            antialias=False).astype(images.dtype)
  top, left = (rh - height) // 2, (rw - width) // 2
  return images[:, top:top + height, left:left + width]
