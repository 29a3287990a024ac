"""Counts multiply-accumulates of matmuls and convolutions by walking a function's jaxpr."""
import math

import jax


def count_macs(fn, *args):
  """MACs of every dot_general and conv_general_dilated in fn(*args) (args may be abstract)."""
  return _walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _walk(jaxpr, times=1):
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
      in_per_group = rhs[dn.rhs_spec[1]]
      total += math.prod(eqn.outvars[0].aval.shape) * kernel_spatial * in_per_group
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
      total += _walk(sub, eqn.params.get("length", 1))
  return total * times


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr
      elif hasattr(v, "eqns"):
        yield v
