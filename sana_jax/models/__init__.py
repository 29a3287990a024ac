"""Flax NNX modules."""
import jax
from flax import nnx


def initialized(make):
  """`make()` (a function building an NNX module) with every parameter initialised in one jitted
  call: built eagerly, each initializer is its own compiled op, seconds on a CPU even for a tiny
  model, and on an accelerator every weight would first be made on the default device."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())
