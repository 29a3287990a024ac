"""Image decoding, resize-cover + centre crop into a bucket, and the caption choice.

Sana's training transform: scale the image (keeping its aspect) so that it covers the bucket, crop
the centre, map to [-1, 1]. Among several captions (VLM re-captioning) one is drawn per epoch with
probability proportional to score^(1/tau) (the reference's CLIP-score weighting, tau = 0.1).
"""
import io
import math
import os

import numpy as np
from PIL import Image, ImageOps

from sana_jax import files
from sana_jax.data import hashing
from sana_jax.errors import SanaError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def decode(data):
  """Encoded bytes -> fully loaded RGB PIL image, EXIF orientation applied. Raises on corrupt data."""
  img = Image.open(io.BytesIO(data))
  img.load()  # decodes everything now: truncated or corrupt files fail here, not later
  img = ImageOps.exif_transpose(img)
  return img if img.mode == "RGB" else img.convert("RGB")


MAX_IMAGE_BYTES = 256 << 20


def load(path, what="image"):
  """An image file a user names -> RGB PIL image (EXIF orientation applied); a missing, oversized,
  truncated or undecodable file is a one-line SanaError."""
  files.regular_file(path, what)
  if os.path.getsize(path) > MAX_IMAGE_BYTES:
    raise SanaError(f"{what} {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return decode(data)
  except Image.UnidentifiedImageError:
    raise SanaError(f"{what} {path} is not an image in a format Pillow reads") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise SanaError(f"{what} {path} is not a readable image ({one_line(e, 120) or type(e).__name__})") from None


def header_size(path):
  """(height, width) as displayed (EXIF orientation applied), from the file header only."""
  with Image.open(path) as img:
    w, h = img.size
    if img.getexif().get(0x0112) in _ROTATED:
      h, w = w, h
  if not (h > 0 and w > 0):
    raise ValueError(f"image of size {w}x{h}")
  return h, w


def resize_cover_crop(img, height, width):
  """PIL image -> uint8 [height, width, 3]: scaled (bicubic, antialiased) so it covers the target,
  keeping its aspect ratio, then centre-cropped. The crop is done as a source box of the one resize,
  so the result is exact to sub-pixel and no larger-than-needed intermediate is made."""
  w, h = img.size
  scale = max(height / h, width / w)
  bw, bh = width / scale, height / scale
  box = (max((w - bw) / 2, 0), max((h - bh) / 2, 0), min((w + bw) / 2, w), min((h + bh) / 2, h))  # rounding
  return np.asarray(img.resize((width, height), Image.BICUBIC, box=box))


def to_unit_range(pixels):
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return pixels.astype(np.float32) / 127.5 - 1.0


def caption_weights(scores, tau):
  """Normalised weights score^(1/tau) (computed in log space: tau = 0.1 would underflow). Scores
  that are absent, all non-positive or non-finite fall back to uniform weights."""
  s = np.asarray(scores, np.float64).reshape(-1)
  ok = np.isfinite(s) & (s > 0)
  if not ok.any():
    return np.full(len(s), 1.0 / max(len(s), 1))
  logw = np.full(len(s), -np.inf)
  logw[ok] = np.log(s[ok]) / tau
  w = np.exp(logw - logw.max())
  return w / w.sum()


def choose_caption(scores, tau, seed, epoch, index):
  """Index of the caption drawn for example `index` in `epoch`: the same in every process and run."""
  n = len(scores)
  if n <= 1:
    return 0
  if not tau or not math.isfinite(tau) or tau <= 0:  # tau -> 0: the best-scored caption
    return int(np.argmax(caption_weights(scores, 1.0)))
  cdf = np.cumsum(caption_weights(scores, tau))
  u = hashing.uniform(seed, epoch, hashing.CAPTION, index) * cdf[-1]
  return int(min(np.searchsorted(cdf, u, side="right"), n - 1))
