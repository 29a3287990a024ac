"""Applies a conversion table: [(source regex, target path, transform)] -> nested state dict.

A target of None consumes the key and drops it (e.g. BatchNorm's num_batches_tracked).
A target path may contain `{layer}`: such parameters are stacked along a leading layers axis, in
the order of the layer index the regex captures as its first group. Every source key must match
exactly one rule, and every parameter of the target tree must be filled with the expected shape;
anything else raises a SanaError that names the key.
"""
import re

import numpy as np

from sana_jax.errors import SanaError


def convert(state_dict, table, expected_shapes, num_layers, source="checkpoint"):
  """state_dict {name: array}; expected_shapes {path tuple: shape}. Returns {path tuple: np.ndarray}."""
  compiled = [(re.compile(pattern + r"\Z"), target, fn) for pattern, target, fn in table]
  flat, stacked = {}, {}
  for name, array in state_dict.items():
    hits = [(m, target, fn) for rx, target, fn in compiled if (m := rx.match(name))]
    if not hits:
      raise SanaError(f"{source}: unexpected key {name!r} (no conversion rule matches it)")
    if len(hits) > 1:
      raise SanaError(f"{source}: key {name!r} matches several conversion rules")
    m, target, fn = hits[0]
    if target is None:
      continue
    value = fn(np.asarray(array))
    dotted = m.expand(target)
    if "{layer}" in dotted:
      layer = int(m.group(1))
      if layer >= num_layers:
        raise SanaError(f"{source}: key {name!r} names layer {layer} but the config has {num_layers} layers")
      stacked.setdefault(_path(dotted.replace(".{layer}", "")), {})[layer] = (name, value)
    else:
      flat[_path(dotted)] = (name, value)

  for path, per_layer in stacked.items():
    missing = sorted(set(range(num_layers)) - set(per_layer))
    if missing:
      raise SanaError(f"{source}: parameter {'.'.join(path)} is missing for layer(s) {missing}")
    arrays = [per_layer[i][1] for i in range(num_layers)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
      raise SanaError(f"{source}: parameter {'.'.join(path)} has different shapes across layers: {shapes}")
    flat[path] = (per_layer[0][0], np.stack(arrays))

  out = {}
  for path, shape in expected_shapes.items():
    if path not in flat:
      raise SanaError(f"{source}: missing weight for parameter {'.'.join(path)}")
    name, value = flat.pop(path)
    if tuple(value.shape) != tuple(shape):
      raise SanaError(f"{source}: key {name!r} has shape {tuple(value.shape)} after conversion, "
                      f"expected {tuple(shape)} for {'.'.join(path)}")
    out[path] = value
  if flat:
    names = sorted(name for name, _ in flat.values())
    raise SanaError(f"{source}: key(s) {names} map to no parameter of this model configuration")
  return out


def _path(dotted):
  return tuple(dotted.split("."))


# transforms shared by converters
def identity(w):
  return w


def linear(w):
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return w.T


def conv1x1(w):
  """torch 1x1 Conv2d weight [out, in, 1, 1] -> kernel [in, out]."""
  return w[:, :, 0, 0].T


def conv_oihw(w):
  """torch Conv2d weight [out, in, kh, kw] -> HWIO kernel [kh, kw, in, out]."""
  return w.transpose(2, 3, 1, 0)


def depthwise(w):
  """torch depthwise Conv2d weight [C, 1, kh, kw] -> [kh, kw, C]."""
  return w[:, 0].transpose(1, 2, 0)


# GLUMBConv's expanded channels are stored as [2, hidden] (value, gate) rather than [2 * hidden]
def glu_expand(w):  # [2h, D, 1, 1] -> [D, 2, h]
  return conv1x1(w).reshape(w.shape[1], 2, -1)


def glu_depthwise(w):  # [2h, 1, 3, 3] -> [3, 3, 2, h]
  return depthwise(w).reshape(w.shape[2], w.shape[3], 2, -1)


def split_two(b):  # [2h] -> [2, h]
  return b.reshape(2, -1)
