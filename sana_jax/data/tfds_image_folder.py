"""TFDS builder for an image folder with caption sidecars (layout: `folder.py`).

    from sana_jax.data import tfds_image_folder
    name = tfds_image_folder.build("/data/my_images", data_dir="/data/tfds")  # "sana_image_folder/my_images"
    # then source="tfds:" + name, data_dir="/data/tfds"; or precompute --images tfds:NAME --data-dir ...

Features: image (the file's encoded bytes when it is RGB, else re-encoded as PNG), captions, scores,
height, width (as displayed, EXIF orientation applied), key (path in the folder). Images that fail
to decode (corrupt, truncated, not an image) or whose sidecar is malformed are skipped, logged, and
counted in the dataset's metadata.json: {"skipped": n, "skipped_examples": [first 100 keys]}.
Stored as ArrayRecord, so `tfds.data_source` reads it without TensorFlow.
"""
import dataclasses
import io
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from sana_jax.data import folder as folder_lib
from sana_jax.data import images
from sana_jax.errors import SanaError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
  folder: str = ""


class SanaImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images + captions (+ clip scores) from a folder; one `train` split."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []  # the config (its folder) is given at build time

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Nothing is downloaded, so no checksums file to find; TFDS's search for one also imports
    # importlib_resources, which Python >= 3.9 installs do not have.
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=f"Images and captions from {self.builder_config.folder}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(), "captions": tfds.features.Sequence(tfds.features.Text()),
            "scores": tfds.features.Sequence(np.float32), "height": np.int32, "width": np.int32,
            "key": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.builder_config.folder)}

  def _generate_examples(self, path):
    items, bad = folder_lib.scan(path)
    kept = 0
    for item in items:
      try:
        with open(item.path, "rb") as f:
          data = f.read()
        img = images.decode(data)  # validates the whole file
        if not _upright_rgb(data):  # keep the file's own bytes only when any decoder reads them alike
          buf = io.BytesIO()
          img.save(buf, "PNG")
          data = buf.getvalue()
      except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never a crash
        bad.append((item.key, f"{type(e).__name__}: {e}"))
        continue
      kept += 1
      yield item.key, {"image": data, "captions": list(item.captions), "scores": list(item.scores),
                       "height": img.height, "width": img.width, "key": item.key}
    for key, reason in bad:
      log.warning("skipped %s: %s", key, reason)
    log.warning("%s: %d images kept, %d skipped", path, kept, len(bad))
    self.info.metadata["skipped"] = len(bad)
    self.info.metadata["skipped_examples"] = [key for key, _ in bad[:100]]
    if not kept:
      raise SanaError(f"image folder {path!r}: no readable images ({len(bad)} skipped)")


def _upright_rgb(data):
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    return img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1


def build(path, data_dir, name=None):
  """Prepares the folder as a TFDS dataset under `data_dir`; returns its name for `tfds:NAME`.
  The config name defaults to the folder's base name (letters, digits, underscores)."""
  if not os.path.isdir(path):
    raise SanaError(f"image folder {path!r} does not exist")
  name = name or re.sub(r"\W+", "_", os.path.basename(os.path.normpath(path))).strip("_").lower() or "images"
  builder = SanaImageFolder(config=ImageFolderConfig(name=name, folder=os.path.abspath(path)), data_dir=data_dir,
                            file_format="array_record")
  builder.download_and_prepare()
  return f"{builder.name}/{name}"


def info(name, data_dir):
  """The prepared dataset's metadata (counts under 'skipped', 'skipped_examples') and split sizes."""
  builder = tfds.builder(name, data_dir=data_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  return {**dict(builder.info.metadata or {}), "num_examples": splits}
