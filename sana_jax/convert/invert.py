"""Running a conversion table backwards: our parameters -> official names and arrays (exporting).

Each of our parameters is matched against the rows' target templates, and the row's source regex is
written out with the captured values filled in. Every name is then run forwards through the same table
and must land back on the parameter it came from through the same row, so the loader and the exporter
cannot drift apart silently.
"""
import importlib.metadata
import re
from typing import Any, NamedTuple

from flax import nnx, traverse_util

from sana_jax.convert.table import Transform
from sana_jax.errors import SanaError


class Entry(NamedTuple):
  """One official tensor: where it comes from in our state and how it is made."""
  name: str
  path: tuple | None       # our parameter (None: a constant the loader drops, e.g. num_batches_tracked)
  layer: int | None        # index along a stacked leading layers axis
  transform: Transform     # its row's transform; `transform.inverse` makes the official array
  shape: tuple             # shape of our array (or slice); element count is kept by every transform


class Component(NamedTuple):
  """A model's export plan: what its official directory holds."""
  config: dict             # config.json's fields (without the library's class/version header)
  model_config: Any        # our config, for the inverses that need a size
  entries: list            # [Entry] in the order they are written
  state: dict              # {path tuple: array} of our parameters
  weights_prefix: str      # diffusion_pytorch_model / model
  library: str             # diffusers / transformers, for model_index.json
  class_name: str
  exact: frozenset = frozenset()  # names written in their own dtype whatever the save's dtype (quantization scales)


def flat_state(model):
  """{path tuple of str: array} of a model's parameters."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  return {tuple(map(str, k)): v for k, v in flat.items()}


def package_version(package, fallback):
  """The installed version of `package` (written into exported configs), else `fallback`."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return fallback


def _groups(pattern):
  """[(open index, close index, group number or None)] for every parenthesised group of a regex,
  numbered as `re` numbers capturing groups (by the position of their opening parenthesis)."""
  spans, stack, count, i = [], [], 0, 0
  while i < len(pattern):
    c = pattern[i]
    if c == "\\":
      i += 1
    elif c == "[":
      i = pattern.index("]", i + 2)  # a class's first character may itself be "]"
    elif c == "(":
      capturing = not pattern.startswith("(?", i)
      count += capturing
      stack.append((i, count if capturing else None))
    elif c == ")":
      start, number = stack.pop()
      spans.append((start, i, number))
    i += 1
  return sorted(spans)


def target_regex(pattern, target):
  """A regex over our dotted paths matching what `target` can produce, each backreference replaced by
  the source group it copies (named g<N>), so a match recovers the captured values."""
  texts = {n: pattern[a + 1:b] for a, b, n in _groups(pattern) if n}
  out, seen = [], set()
  for piece in re.split(r"(\\\d+)", target.replace(".{layer}", "")):
    if re.fullmatch(r"\\\d+", piece):
      n = int(piece[1:])
      out.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>{texts[n]})")
      seen.add(n)
    else:
      out.append(re.escape(piece))
  return re.compile("".join(out))


def unparse(pattern, values, optional):
  """The string `pattern` matches with capturing group N equal to values[N]; an optional group
  `(?:X)?` is written when optional[X] is true. Any other regex syntax outside a capturing group
  has no single spelling and is an error in the table."""
  spans = {a: (b, n) for a, b, n in _groups(pattern)}
  out, i = [], 0
  while i < len(pattern):
    c = pattern[i]
    if i in spans:
      end, number = spans[i]
      if number is not None:
        if number not in values:
          raise ValueError(f"{pattern!r}: group {number} is neither copied to the target nor the layer index")
        out.append(values[number])
        i = end + 1
        continue
      inner = pattern[i + 3:end]
      if pattern[end + 1:end + 2] != "?" or inner not in optional:
        raise ValueError(f"{pattern!r}: say whether the optional group {inner!r} is written on export")
      out.append(unparse(inner, {}, optional) if optional[inner] else "")
      i = end + 2
    elif c == "\\" and not pattern[i + 1].isalnum():
      out.append(pattern[i + 1])
      i += 2
    elif c in "\\.[]|*+?{}^$":
      raise ValueError(f"{pattern!r}: cannot spell out {pattern[i:]!r}")
    else:
      out.append(c)
      i += 1
  return "".join(out)


def plan(state, table, *, optional=None, source="model"):
  """Entries for every array of `state` ({path tuple: array}), named by running `table` backwards.

  optional: {inner text of an optional regex group: write it?}."""
  rules = [(target_regex(p, t), p, t, tr) for p, t, tr in table if t is not None]
  entries = []
  for path, leaf in state.items():
    dotted = ".".join(path)
    hits = [(m, p, t, tr) for rx, p, t, tr in rules if (m := rx.fullmatch(dotted))]
    if len(hits) != 1:
      why = "no conversion rule produces it" if not hits else "several conversion rules produce it"
      raise SanaError(f"{source}: cannot export parameter {dotted}: {why}")
    m, pattern, target, transform = hits[0]
    values = {int(k[1:]): v for k, v in m.groupdict().items()}
    if "{layer}" in target:
      entries += [Entry(unparse(pattern, {**values, 1: str(i)}, optional or {}), path, i, transform, leaf.shape[1:])
                  for i in range(leaf.shape[0])]
    else:
      entries.append(Entry(unparse(pattern, values, optional or {}), path, None, transform, leaf.shape))
  return entries


def check_names(entries, table, source="model"):
  """Runs every exported name forwards through the loader's table: it must hit exactly one rule,
  which must lead back to the entry's parameter (and layer) through the entry's own transform."""
  compiled = [(re.compile(p + r"\Z"), t, tr) for p, t, tr in table]
  seen = set()
  for e in entries:
    if e.name in seen:
      raise SanaError(f"{source}: two parameters export to the same name {e.name!r}")
    seen.add(e.name)
    hits = [(m, t, tr) for rx, t, tr in compiled if (m := rx.match(e.name))]
    if len(hits) != 1:
      raise SanaError(f"{source}: exported name {e.name!r} matches {len(hits)} loader rules, not one")
    m, target, transform = hits[0]
    if target is None or e.path is None:
      if target is not None or e.path is not None:
        raise SanaError(f"{source}: exported name {e.name!r} would not load back as written")
      continue
    dotted = m.expand(target)
    layer = int(m.group(1)) if "{layer}" in dotted else None
    if (dotted.replace(".{layer}", ""), layer) != (".".join(e.path), e.layer):
      raise SanaError(f"{source}: exported name {e.name!r} would load into {dotted} (layer {layer}), "
                      f"not {'.'.join(e.path)} (layer {e.layer})")
    if transform is not e.transform:
      raise SanaError(f"{source}: exported name {e.name!r} would load through {transform.name}, "
                      f"which the array's export transform {e.transform.name} does not invert")
