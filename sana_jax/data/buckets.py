"""Aspect-ratio buckets: the (height, width) pixel sizes examples are resized and cropped into.
Every global batch holds examples of one bucket."""
from sana_jax import aspect_ratio
from sana_jax.errors import SanaError


def bucket_table(buckets, latent_size, spatial_compression):
  """[(ratio, height, width)] in pixels.

  buckets: None -> one square bucket of latent_size * spatial_compression pixels;
  an int resolution (512, 1024, 2048, 4096) -> Sana's aspect-ratio bins for it (`aspect_ratio.bins`);
  a list of (height, width) pixel pairs -> exactly those.
  """
  if buckets is None:
    side = latent_size * spatial_compression
    table = [(1.0, side, side)]
  elif isinstance(buckets, int) and not isinstance(buckets, bool):
    if buckets not in aspect_ratio.TABLE_FOR_SAMPLE_SIZE.values():
      raise SanaError(f"buckets={buckets}: no aspect-ratio table for that resolution; "
                      f"expected one of {sorted(aspect_ratio.TABLE_FOR_SAMPLE_SIZE.values())} or a list of (h, w)")
    table = [(float(r), h, w) for r, (h, w) in aspect_ratio.bins(buckets).items()]
  else:
    try:
      table = [(int(h) / int(w), int(h), int(w)) for h, w in buckets]
    except (TypeError, ValueError, ZeroDivisionError):
      raise SanaError(f"buckets={buckets!r}: expected None, a resolution, or a list of (height, width)") from None
  for _, h, w in table:
    if h <= 0 or w <= 0 or h % spatial_compression or w % spatial_compression:
      raise SanaError(f"bucket {h}x{w} px is not a positive multiple of {spatial_compression} "
                      "(the autoencoder's spatial compression)")
  if not table:
    raise SanaError("buckets: empty list")
  return table


def nearest_bucket(height, width, table):
  """Index of the bucket whose ratio is nearest height / width (the first on ties), as the reference's
  `get_closest_ratio` and diffusers' binning choose."""
  ratio = height / width
  return min(range(len(table)), key=lambda i: abs(table[i][0] - ratio))
