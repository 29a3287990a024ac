"""The floating-point dtypes a user may name (float32, bfloat16, float16): one table for models,
checkpoints and configs. numpy dtypes, which JAX takes as they are."""
import ml_dtypes
import numpy as np

from sana_jax.errors import SanaError, short

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def resolve(value, what="dtype"):
  """A dtype from its name ("bfloat16") or any dtype-like (jnp.bfloat16, np.float32); must be in DTYPES."""
  try:
    name = value if isinstance(value, str) else np.dtype(value).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise SanaError(f"{what} {short(value)}; expected one of {', '.join(DTYPES)}")
  return DTYPES[name]


def is_float(dtype):
  return np.dtype(dtype).kind == "f" or np.dtype(dtype) == DTYPES["bfloat16"]
