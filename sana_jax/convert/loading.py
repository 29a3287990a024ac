"""The load path shared by the converters: config -> abstract model -> converted weights -> model."""
import os

import jax
import numpy as np
from flax import nnx, traverse_util

from sana_jax import dtypes, files, parallel
from sana_jax.convert import safetensors_io
from sana_jax.convert.table import convert
from sana_jax.errors import SanaError, short


def resolve_dir(path, subfolder):
  """A component directory (config.json + weights), or a pipeline directory holding it under `subfolder`."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise SanaError(f"model directory {path} does not exist")
  if os.path.lexists(os.path.join(path, "config.json")):
    return path
  sub = files.inside(path, subfolder, "component")
  if os.path.lexists(os.path.join(sub, "config.json")):
    return sub
  raise SanaError(f"{path}: no config.json (nor {subfolder}/config.json) found")


def read_config(path, class_name=None):
  """config.json of a component directory, checked to describe `class_name` when given."""
  raw = files.read_json(files.inside(path, "config.json", "config"), "config")
  if class_name and raw.get("_class_name", class_name) != class_name:
    raise SanaError(f"{path}/config.json describes a {short(raw['_class_name'])}, not a {class_name}")
  return raw


def load_weights(path, build, table, *, num_layers=0, mesh=None, rules=None,
                 weights_prefix="diffusion_pytorch_model"):
  """Builds `build()` abstractly, fills it from diffusers safetensors in `path` via `table`."""
  return load_state(safetensors_io.read_dir(path, weights_prefix), build, table, num_layers=num_layers, mesh=mesh,
                    rules=rules, source=path)


def load_state(state_dict, build, table, *, num_layers=0, mesh=None, rules=None, source="checkpoint"):
  """Builds `build()` abstractly, fills it from {official name: array} via `table`."""
  abstract_model = nnx.eval_shape(build)
  shapes = {k: v.shape for k, v in abstract_leaves(abstract_model).items()}
  return fill(abstract_model, convert(state_dict, table, shapes, num_layers, source=source), mesh, rules)


def abstract_leaves(abstract_model):
  """{path tuple of str: shape-dtype struct} of an abstract model's state."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract_model)))
  return {tuple(map(str, k)): v for k, v in flat.items()}


def fill(abstract_model, weights, mesh=None, rules=None):
  """The model with every leaf of `abstract_model` taken from weights {path tuple of str: array}, cast to
  the leaf's dtype on the host (and placed by the mesh's rules)."""
  graphdef, abstract = nnx.split(abstract_model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))  # keys keep their types (List indices)
  name = lambda key: tuple(map(str, key))
  shardings = {}
  if mesh is not None:
    tree = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, rules))
    shardings = {name(k): v for k, v in traverse_util.flatten_dict(tree).items()}
  # cast on the host and transfer once; with a mesh each device receives only its own shard
  arrays = {k: jax.device_put(np.asarray(weights[name(k)]).astype(v.dtype), shardings.get(name(k)))
            for k, v in flat.items()}
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(arrays))
  return nnx.merge(graphdef, abstract)


def load_dit_family(state_dict, model_cls, cfg, table, *, dtype, param_dtype, attention_impl="xla", mesh=None,
                    rules=None, source="checkpoint"):
  """A SanaTransformer / SanaControlNetModel (`model_cls`) with config `cfg` from {official name: array}."""
  dtype, param_dtype = dtypes.resolve(dtype), dtypes.resolve(param_dtype)
  build = lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
  return load_state(state_dict, build, table, num_layers=cfg.num_layers, mesh=mesh, rules=rules, source=source)
