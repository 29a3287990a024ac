"""The shapes demo: a synthetic text-to-image task small enough to train here, and its alignment metric.

  shapes.py       images + captions from a small grammar (exact flat colours, 64 px), held-out pairs
  tfds_shapes.py  TFDS builder `sana_shapes` (ArrayRecord) for `data.source = "tfds:sana_shapes/default"`
  evaluate.py     detection by colour + geometry, GenEval-style all-or-nothing scoring, CLI

Kept import-light: nothing here imports TensorFlow Datasets except `tfds_shapes`.
"""
