"""Typed, bounded fields of configs that come from users' files (config.json, scheduler_config.json,
model_index.json) or command lines.

A check is a function (value, name) -> value that returns the value in the form the code uses (JSON
lists as tuples, integral floats as ints) or raises a short SanaError naming the field. Configs declare
one check per field they use (`validate(d, CHECKS, source)`); bounds are generous for real models and
tight enough that no value can make the program allocate without limit or print a huge message.
"""
import math

from sana_jax.errors import SanaError, short


def _fail(name, value, expected):
  raise SanaError(f"{name} = {short(value, 40)}: expected {expected}")


def integer(lo, hi):
  def check(value, name):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if type(value) is not int or not lo <= value <= hi:
      _fail(name, value, f"an integer in [{lo}, {hi}]")
    return value
  return check


def real(lo=-math.inf, hi=math.inf, *, above=None):
  """A finite number in [lo, hi] (or > `above` when given), int or float as given (configs are
  written back as they were read)."""
  def check(value, name):
    bounds = f"> {above}" if above is not None else f"in [{lo}, {hi}]"
    if type(value) is bool or not isinstance(value, (int, float)) or not math.isfinite(value):
      _fail(name, value, f"a finite number {bounds}")
    if (above is not None and not value > above) or not lo <= value <= hi:
      _fail(name, value, f"a number {bounds}")
    return value
  return check


def boolean(value, name):
  if type(value) is not bool:
    _fail(name, value, "true or false")
  return value


def text(max_len=1000):
  def check(value, name):
    if not isinstance(value, str) or len(value) > max_len:
      _fail(name, value, f"a string of at most {max_len} characters")
    return value
  return check


def choice(*options):
  def check(value, name):
    if not isinstance(value, (str, int, float, type(None))) or value not in options:
      _fail(name, value, f"one of {', '.join(map(repr, options))}")
    return value
  return check


def optional(inner):
  """None, or what `inner` accepts."""
  return lambda value, name: None if value is None else inner(value, name)


def sequence(inner, *, min_len=0, max_len=64):
  """A list (or tuple) of items `inner` accepts, as a tuple."""
  def check(value, name):
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
      _fail(name, value, f"a list of {min_len} to {max_len} items")
    return tuple(inner(v, f"{name}[{i}]") for i, v in enumerate(value))
  return check


def either(first, second):
  """What `first` accepts, else what `second` accepts (the second's error is reported)."""
  def check(value, name):
    try:
      return first(value, name)
    except SanaError:
      return second(value, name)
  return check


def validate(d, checks, source):
  """A copy of dict `d` with every field named in `checks` checked and normalised; fields without a
  check pass through unchanged. Errors are prefixed with `source` (a file name or config block)."""
  out = dict(d)
  for name, check in checks.items():
    if name in out:
      try:
        out[name] = check(out[name], name)
      except SanaError as e:
        raise SanaError(f"{source}: {e}") from None
  return out
