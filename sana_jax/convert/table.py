"""Conversion tables: rows of (official name regex, our parameter path, Transform), read both ways.

Forwards (`convert`, loading): every source key must match exactly one row, and every parameter of the
target tree must be filled with the expected shape; anything else is a SanaError naming the key. A
target of None consumes the key and drops it (e.g. BatchNorm's num_batches_tracked). A target path may
contain `{layer}`: such parameters are stacked along a leading layers axis, in the order of the layer
index the regex captures as its first group.

Backwards (`sana_jax.convert.invert`, exporting): each row's Transform carries its inverse, so the
exporter reads the same rows and never reaches into a converter's private helpers.
"""
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from sana_jax.errors import SanaError, short


class Transform(NamedTuple):
  """How an official array becomes ours (`forward(w)`) and back (`inverse(w, config)`: the model config,
  for the few inverses that need a size the array no longer shows)."""
  name: str
  forward: Callable
  inverse: Callable


def convert(state_dict, table, expected_shapes, num_layers, source="checkpoint"):
  """state_dict {name: array}; expected_shapes {path tuple: shape}. Returns {path tuple: np.ndarray}."""
  compiled = [(re.compile(pattern + r"\Z"), target, t) for pattern, target, t in table]
  flat, stacked = {}, {}
  for name, array in state_dict.items():
    hits = [(m, target, t) for rx, target, t in compiled if (m := rx.match(name))]
    if not hits:
      raise SanaError(f"{source}: unexpected key {short(name)} (no conversion rule matches it)")
    if len(hits) > 1:
      raise SanaError(f"{source}: key {short(name)} matches several conversion rules")
    m, target, t = hits[0]
    if target is None:
      continue
    try:
      value = t.forward(np.asarray(array))
    except ValueError:  # a reshape that cannot hold: the stored shape is wrong for this key
      raise SanaError(f"{source}: key {short(name)} has shape {tuple(np.shape(array))}, which {t.name} "
                      f"cannot convert") from None
    dotted = m.expand(target)
    if "{layer}" in dotted:
      layer = int(m.group(1))
      if layer >= num_layers:
        raise SanaError(f"{source}: key {short(name)} names layer {layer} but the config has {num_layers} layers")
      stacked.setdefault(_path(dotted.replace(".{layer}", "")), {})[layer] = (name, value)
    else:
      flat[_path(dotted)] = (name, value)

  for path, per_layer in stacked.items():
    missing = sorted(set(range(num_layers)) - set(per_layer))
    if missing:
      more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
      raise SanaError(f"{source}: parameter {'.'.join(path)} is missing for layer(s) {missing[:8]}{more} "
                      f"of {num_layers}")
    arrays = [per_layer[i][1] for i in range(num_layers)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
      raise SanaError(f"{source}: parameter {'.'.join(path)} has different shapes across layers: "
                      f"{short(sorted(shapes))}")
    flat[path] = (per_layer[0][0], np.stack(arrays))

  out = {}
  for path, shape in expected_shapes.items():
    if path not in flat:
      raise SanaError(f"{source}: missing weight for parameter {'.'.join(path)}")
    name, value = flat.pop(path)
    if tuple(value.shape) != tuple(shape):
      raise SanaError(f"{source}: key {short(name)} has shape {tuple(value.shape)} after conversion, "
                      f"expected {tuple(shape)} for {'.'.join(path)}")
    out[path] = value
  if flat:
    names = sorted(name for name, _ in flat.values())
    raise SanaError(f"{source}: {len(names)} key(s) map to no parameter of this model configuration, "
                    f"e.g. {short(names[0])}")
  return out


def _path(dotted):
  return tuple(dotted.split("."))


# ---------------------------------------------------------------------------------------------
# transforms shared by converters: torch layouts <-> ours


def _permute_back(w, perm):
  return w.transpose(np.argsort(perm))


IDENTITY = Transform("identity", lambda w: w, lambda w, cfg: w)
# torch Linear weight [out, in] <-> kernel [in, out]
LINEAR = Transform("linear", lambda w: w.T, lambda w, cfg: w.T)
# torch 1x1 Conv2d weight [out, in, 1, 1] <-> kernel [in, out]
CONV1X1 = Transform("conv1x1", lambda w: w[:, :, 0, 0].T, lambda w, cfg: w.T[:, :, None, None])
# torch Conv2d weight [out, in, kh, kw] <-> HWIO kernel [kh, kw, in, out]
CONV_OIHW = Transform("conv_oihw", lambda w: w.transpose(2, 3, 1, 0), lambda w, cfg: _permute_back(w, (2, 3, 1, 0)))
# torch depthwise Conv2d weight [C, 1, kh, kw] <-> [kh, kw, C]
DEPTHWISE = Transform("depthwise", lambda w: w[:, 0].transpose(1, 2, 0),
                      lambda w, cfg: _permute_back(w, (1, 2, 0))[:, None])
# GLUMBConv's expanded channels are stored as [2, hidden] (value, gate) rather than [2 * hidden]
GLU_EXPAND = Transform("glu_expand",  # [2h, D, 1, 1] <-> [D, 2, h]
                       lambda w: CONV1X1.forward(w).reshape(w.shape[1], 2, -1),
                       lambda w, cfg: CONV1X1.inverse(w.reshape(w.shape[0], -1), cfg))
GLU_DEPTHWISE = Transform("glu_depthwise",  # [2h, 1, 3, 3] <-> [3, 3, 2, h]
                          lambda w: DEPTHWISE.forward(w).reshape(w.shape[2], w.shape[3], 2, -1),
                          lambda w, cfg: DEPTHWISE.inverse(w.reshape(*w.shape[:2], -1), cfg))
SPLIT_TWO = Transform("split_two", lambda b: b.reshape(2, -1), lambda b, cfg: b.reshape(-1))  # [2h] <-> [2, h]
