"""Image folders with caption sidecars: `x.jpg` + `x.txt` (one caption) or `x.json`
({"captions": [...], "clip_scores": [...]}, the reference's VLM re-captioning). JSON wins when both
exist; an image with neither gets the empty caption (unconditional). Sub-folders are walked; keys are
paths relative to the folder, in sorted order, so indices are stable across runs. With a DreamBooth
prompt every image gets that one caption and sidecars are not read.
"""
import dataclasses
import json
import os

from sana_jax.data.images import IMAGE_EXTENSIONS
from sana_jax.errors import SanaError


@dataclasses.dataclass(frozen=True)
class Item:
  key: str        # path relative to the folder
  path: str
  captions: tuple
  scores: tuple   # one per caption; 1.0 each when the sidecar has none (uniform choice)


def read_sidecar(path):
  """(captions, scores) for image `path`. Raises ValueError on a malformed sidecar."""
  stem = os.path.splitext(path)[0]
  if os.path.exists(stem + ".json"):
    with open(stem + ".json", encoding="utf-8") as f:
      info = json.load(f)
    captions = info.get("captions", [info["caption"]] if "caption" in info else None)
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
      raise ValueError("JSON sidecar needs a non-empty list of strings under 'captions'")
    scores = info.get("clip_scores", [1.0] * len(captions))
    if len(scores) != len(captions):
      raise ValueError(f"{len(captions)} captions but {len(scores)} clip_scores")
    return tuple(captions), tuple(float(s) for s in scores)
  if os.path.exists(stem + ".txt"):
    with open(stem + ".txt", encoding="utf-8") as f:
      return (f.read().strip(),), (1.0,)
  return ("",), (1.0,)


def scan(folder, prompt=None):
  """(items, bad): the images under `folder` with their captions (`prompt` for all, when given), and
  (key, reason) for each image whose sidecar could not be read."""
  if not os.path.isdir(folder):
    raise SanaError(f"image folder {folder!r} does not exist")
  items, bad = [], []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(root, name)
      key = os.path.relpath(path, folder)
      if prompt is not None:
        items.append(Item(key, path, (prompt,), (1.0,)))
        continue
      try:
        captions, scores = read_sidecar(path)
      except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        bad.append((key, f"caption sidecar: {e}"))
        continue
      items.append(Item(key, path, captions, scores))
  return items, bad
