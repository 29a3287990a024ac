"""TFDS builder `sana_shapes`: the shapes dataset (`shapes.py`) as ArrayRecord, readable without TensorFlow.

    from sana_jax.demo import tfds_shapes
    name = tfds_shapes.build("/data/tfds")                    # "sana_shapes/default": 20000 train, 1000 validation
    name = tfds_shapes.build("/data/tfds", num_train=50000)   # "sana_shapes/n50000_v1000_s0"
    # training: data.source = "tfds:" + name, data.data_dir = "/data/tfds"  (sana_jax.data.TfdsImageSource)
    python -m sana_jax.demo.tfds_shapes --data-dir /data/tfds [--config tiny] [--num-train N]

Features: image (PNG bytes, 64x64 RGB), caption (text: TfdsImageSource reads a single `caption` as
the only caption), objects (JSON list of the objects' colour, shape, size, size_px, bbox, centre),
height, width (so the source assigns buckets without decoding), key ("train/123").
Example i of split s is `shapes.generate(i, config.seed, s)`; no held-out colour-shape pair appears in
either split (the "heldout" split of `shapes.py` is for evaluation and is not written here).
"""
import dataclasses
import io
import json
import sys

import numpy as np
import tensorflow_datasets as tfds

from sana_jax.demo import shapes
from sana_jax.errors import ArgumentParser, SanaError, cli_main


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 20000
  num_validation: int = 1000
  seed: int = 0


CONFIGS = {c.name: c for c in (
    ShapesConfig(name="default", description="20000 train, 1000 validation"),
    ShapesConfig(name="tiny", num_train=256, num_validation=64, description="smoke tests"))}


class SanaShapes(tfds.core.GeneratorBasedBuilder):
  """Flat-coloured circles, squares and triangles on white with exact captions."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = list(CONFIGS.values())

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Nothing is downloaded, so no checksums file; TFDS's search for one imports importlib_resources,
    # which Python >= 3.9 installs lack (as in sana_jax/data/tfds_image_folder.py).
    return None

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Synthetic shapes, seed {c.seed}; held out: {shapes.HELD_OUT}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(), "caption": tfds.features.Text(), "objects": tfds.features.Text(),
            "height": np.int32, "width": np.int32, "key": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(held_out=[list(p) for p in shapes.HELD_OUT], palette=shapes.PALETTE))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train, c.seed),
            "validation": self._generate_examples("validation", c.num_validation, c.seed)}

  def _generate_examples(self, split, n, seed):
    from PIL import Image
    for i in range(n):
      image, caption, objects = shapes.generate(i, seed, split)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, "PNG")
      yield i, {"image": buf.getvalue(), "caption": caption, "objects": json.dumps(objects),
                "height": image.shape[0], "width": image.shape[1], "key": f"{split}/{i}"}


def build(data_dir, config="default", *, num_train=None, num_validation=None, seed=None):
  """Prepares the dataset under `data_dir` (a no-op when already there); returns its name for `tfds:NAME`.
  Overriding a count or the seed makes a config named after them, e.g. "n50000_v1000_s0"."""
  if config not in CONFIGS:
    raise SanaError(f"sana_shapes config {config!r}; expected one of {sorted(CONFIGS)}")
  c = CONFIGS[config]
  overrides = {k: v for k, v in dict(num_train=num_train, num_validation=num_validation, seed=seed).items()
               if v is not None}
  if overrides:
    c = dataclasses.replace(c, **overrides)
    if c.num_train <= 0 or c.num_validation <= 0:
      raise SanaError(f"sana_shapes: num_train {c.num_train} and num_validation {c.num_validation} must be positive")
    c = dataclasses.replace(c, name=f"n{c.num_train}_v{c.num_validation}_s{c.seed}",
                            description=f"{c.num_train} train, {c.num_validation} validation, seed {c.seed}")
  builder = SanaShapes(config=c, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return f"{builder.name}/{c.name}"


@cli_main
def main(argv=None):
  p = ArgumentParser(prog="python -m sana_jax.demo.tfds_shapes",
                     description="Build the sana_shapes TFDS dataset (ArrayRecord).")
  p.add_argument("--data-dir", required=True)
  p.add_argument("--config", default="default", choices=sorted(CONFIGS))
  p.add_argument("--num-train", type=int)
  p.add_argument("--num-validation", type=int)
  p.add_argument("--seed", type=int)
  args = p.parse_args(argv)
  name = build(args.data_dir, args.config, num_train=args.num_train, num_validation=args.num_validation,
               seed=args.seed)
  print(f"built {name} in {args.data_dir}: data.source='tfds:{name}', data.data_dir={args.data_dir!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
