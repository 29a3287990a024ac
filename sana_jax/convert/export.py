"""Our models -> official checkpoint directories: the inverse of the loaders.

Names come from the loaders' own tables, run backwards: each of our parameters is matched against the
rules' target templates, and the rule's source regex is written out with the captured values filled
in. Every name is then run forwards through the same table and must land back on the parameter it
came from, and every transform has a registered inverse, so the loader and the exporter cannot drift
apart silently. Files are `safetensors.numpy` (no torch); a directory appears whole or not at all.

  transformer/  config.json (diffusers SanaTransformer2DModel) + diffusion_pytorch_model.safetensors
  vae/          config.json (diffusers AutoencoderDC)           + diffusion_pytorch_model.safetensors
  text_encoder/ config.json (transformers Gemma2Model)          + model.safetensors
  (safetensors over `max_shard_bytes` are split into numbered shards with a .index.json, as both
  libraries do)
"""
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import shutil
import uuid
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from sana_jax.convert import diffusers_dcae, diffusers_dit, transformers_gemma
from sana_jax.convert.table import (conv1x1, conv_oihw, depthwise, glu_depthwise, glu_expand, identity, linear,
                                    split_two)
from sana_jax.errors import SanaError
from sana_jax.models.dcae import DCAE
from sana_jax.models.dit import SanaTransformer
from sana_jax.models.gemma import GemmaTextEncoder

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
MAX_SHARD_BYTES = 5 * 10**9  # the shard size the official Sana repositories were written with ("5GB")


# ---------------------------------------------------------------------------------------------
# inverse transforms: our array -> official array, one per forward transform of the tables


def _permute_back(w, perm):
  return w.transpose(np.argsort(perm))


def _unlinear(w):  # [in, out] -> [out, in]
  return w.T


def _unconv1x1(w):  # [in, out] -> [out, in, 1, 1]
  return w.T[:, :, None, None]


def _unconv_oihw(w):  # HWIO -> OIHW
  return _permute_back(w, (2, 3, 1, 0))


def _undepthwise(w):  # [kh, kw, C] -> [C, 1, kh, kw]
  return _permute_back(w, (1, 2, 0))[:, None]


def _unglu_expand(w):  # [D, 2, h] -> [2h, D, 1, 1]
  return _unconv1x1(w.reshape(w.shape[0], -1))


def _unglu_depthwise(w):  # [kh, kw, 2, h] -> [2h, 1, kh, kw]
  return _undepthwise(w.reshape(*w.shape[:2], -1))


def _flatten(w):  # [2, h] or [6, D] -> [2h] or [6D]
  return w.reshape(-1)


def _unadaln_kernel(w):  # [D, 6, D] -> [6D, D]
  return w.reshape(w.shape[0], -1).T


def _ungrouped_1x1(w):  # [G, hd_in, hd_out] -> [G * hd, hd, 1, 1]
  return w.transpose(0, 2, 1).reshape(-1, w.shape[1])[:, :, None, None]


def _unpatch_conv(patch_size):
  def inverse(w):  # [(row, col, C), D] -> [D, C, p, p]
    return _permute_back(w.reshape(patch_size, patch_size, -1, w.shape[-1]), (2, 3, 1, 0))
  return inverse


INVERSES = {
    identity: identity, linear: _unlinear, conv1x1: _unconv1x1, conv_oihw: _unconv_oihw, depthwise: _undepthwise,
    glu_expand: _unglu_expand, glu_depthwise: _unglu_depthwise, split_two: _flatten,
    diffusers_dit._adaln_kernel: _unadaln_kernel, diffusers_dit._six: _flatten,
    diffusers_dcae._grouped_1x1: _ungrouped_1x1,
}


# ---------------------------------------------------------------------------------------------
# running a conversion table backwards


class Entry(NamedTuple):
  """One official tensor: where it comes from in our state and how it is made."""
  name: str
  path: tuple | None       # our parameter (None: a constant the loader drops, e.g. num_batches_tracked)
  layer: int | None        # index along a stacked leading layers axis
  inverse: Callable        # our array (one layer's slice) -> the official array
  shape: tuple             # shape of our array (or slice); element count is kept by every transform


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


def _target_regex(pattern, target):
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


def _unparse(pattern, values, optional):
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
      out.append(_unparse(inner, {}, optional) if optional[inner] else "")
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


def plan(state, table, *, optional=None, inverses=None, source="model"):
  """Entries for every array of `state` ({path tuple: array}), named by running `table` backwards.

  optional: {inner text of an optional regex group: write it?}; inverses: extra {forward fn: inverse}."""
  inverses = {**INVERSES, **(inverses or {})}
  rules = [(_target_regex(p, t), p, t, fn) for p, t, fn in table if t is not None]
  entries = []
  for path, leaf in state.items():
    dotted = ".".join(path)
    hits = [(m, p, t, fn) for rx, p, t, fn in rules if (m := rx.fullmatch(dotted))]
    if len(hits) != 1:
      why = "no conversion rule produces it" if not hits else "several conversion rules produce it"
      raise SanaError(f"{source}: cannot export parameter {dotted}: {why}")
    m, pattern, target, fn = hits[0]
    if fn not in inverses:
      raise SanaError(f"{source}: transform {fn.__name__} (for {dotted}) has no inverse to export with")
    values = {int(k[1:]): v for k, v in m.groupdict().items()}
    if "{layer}" in target:
      entries += [Entry(_unparse(pattern, {**values, 1: str(i)}, optional or {}), path, i, inverses[fn], leaf.shape[1:])
                  for i in range(leaf.shape[0])]
    else:
      entries.append(Entry(_unparse(pattern, values, optional or {}), path, None, inverses[fn], leaf.shape))
  return entries


def check_names(entries, table, inverses=None, source="model"):
  """Runs every exported name forwards through the loader's table: it must hit exactly one rule,
  which must lead back to the entry's parameter (and layer) by the transform the entry inverts."""
  inverses = {**INVERSES, **(inverses or {})}
  compiled = [(re.compile(p + r"\Z"), t, fn) for p, t, fn in table]
  seen = set()
  for e in entries:
    if e.name in seen:
      raise SanaError(f"{source}: two parameters export to the same name {e.name!r}")
    seen.add(e.name)
    hits = [(m, t, fn) for rx, t, fn in compiled if (m := rx.match(e.name))]
    if len(hits) != 1:
      raise SanaError(f"{source}: exported name {e.name!r} matches {len(hits)} loader rules, not one")
    m, target, fn = hits[0]
    if target is None or e.path is None:
      if target is not None or e.path is not None:
        raise SanaError(f"{source}: exported name {e.name!r} would not load back as written")
      continue
    dotted = m.expand(target)
    layer = int(m.group(1)) if "{layer}" in dotted else None
    if (dotted.replace(".{layer}", ""), layer) != (".".join(e.path), e.layer):
      raise SanaError(f"{source}: exported name {e.name!r} would load into {dotted} (layer {layer}), "
                      f"not {'.'.join(e.path)} (layer {e.layer})")
    if inverses.get(fn) is not e.inverse:
      raise SanaError(f"{source}: exported name {e.name!r} would load through {fn.__name__}, "
                      f"which the array's export transform {e.inverse.__name__} does not invert")


# ---------------------------------------------------------------------------------------------
# the three models


class Component(NamedTuple):
  config: dict
  entries: list
  state: dict              # {path tuple: array} of our parameters
  weights_prefix: str      # diffusion_pytorch_model / model
  library: str             # for model_index.json
  class_name: str


def _state(model):
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  return {tuple(map(str, k)): v for k, v in flat.items()}


def _version(package, fallback):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return fallback


def _diffusers_header(class_name):
  return {"_class_name": class_name, "_diffusers_version": _version("diffusers", "0.33.0")}


TRANSFORMER_OURS_ONLY = ("linear_attention_eps", "remat", "scan_unroll")  # runtime options, not in diffusers


def transformer_component(model):
  cfg = model.config
  inverses = {diffusers_dit._patch_conv: _unpatch_conv(cfg.patch_size)}
  # diffusers nests the timestep embedder under `emb.` (AdaLayerNormSingle) unless a guidance
  # embedding is present (SanaCombinedTimestepGuidanceEmbeddings)
  optional = {r"emb\.": not cfg.guidance_embeds}
  state = _state(model)
  entries = plan(state, diffusers_dit.TABLE, optional=optional, inverses=inverses, source="transformer")
  check_names(entries, diffusers_dit.TABLE, inverses, "transformer")
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TRANSFORMER_OURS_ONLY}
  config = {**_diffusers_header("SanaTransformer2DModel"), **fields, "dropout": 0.0}
  return Component(config, entries, state, "diffusion_pytorch_model", "diffusers", "SanaTransformer2DModel")


def vae_component(model):
  state = _state(model)
  entries = plan(state, diffusers_dcae.TABLE, source="vae")
  # torch's BatchNorm2d carries a step counter the loader drops; inference never reads it
  entries += [Entry(e.name.replace(".running_mean", ".num_batches_tracked"), None, None,
                    lambda _: np.zeros((), np.int64), ()) for e in entries if e.name.endswith(".running_mean")]
  check_names(entries, diffusers_dcae.TABLE, source="vae")
  config = {**_diffusers_header("AutoencoderDC"), **dataclasses.asdict(model.config)}
  return Component(config, entries, state, "diffusion_pytorch_model", "diffusers", "AutoencoderDC")


def gemma_config(cfg, dtype_name):
  """transformers' Gemma2Model config.json for our GemmaConfig (plus `rope_theta` for readers older
  than transformers 5's `rope_parameters`). Token ids are Gemma's; layer_types is written only when
  set, so an unset one stays unset (transformers' default is the same alternation as ours)."""
  ours = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("scan_unroll", "layer_types")}
  config = {
      "architectures": ["Gemma2Model"], "model_type": "gemma2", **ours,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "attention_dropout": 0.0, "initializer_range": 0.02, "max_position_embeddings": 8192,
      "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "use_cache": True,
      "dtype": dtype_name, "transformers_version": _version("transformers", "4.47.0"),
  }
  if cfg.layer_types:
    config["layer_types"] = list(cfg.layer_types)
  return config


def gemma_component(model, dtype=None):
  """dtype: the weights' dtype as saved (for config.json's `dtype`); None: the parameters' own."""
  dt = _dtype(dtype) if dtype is not None else np.dtype(model.embed_tokens[...].dtype)
  optional = {r"model\.": False}  # Gemma2Model's own names (Gemma2ForCausalLM adds "model.")
  state = _state(model)
  entries = plan(state, transformers_gemma.TABLE, optional=optional, source="text_encoder")
  check_names(entries, transformers_gemma.TABLE, source="text_encoder")
  return Component(gemma_config(model.config, dt.name), entries, state, "model", "transformers", "Gemma2Model")


def component(model, dtype=None):
  """The export plan of a SanaTransformer, DCAE or GemmaTextEncoder."""
  if isinstance(model, SanaTransformer):
    return transformer_component(model)
  if isinstance(model, DCAE):
    return vae_component(model)
  if isinstance(model, GemmaTextEncoder):
    return gemma_component(model, dtype)
  raise SanaError(f"cannot export a {type(model).__name__}; expected SanaTransformer, DCAE or GemmaTextEncoder")


# ---------------------------------------------------------------------------------------------
# arrays and files


def _dtype(dtype):
  """None (keep each parameter's dtype), or float32 / bfloat16 / float16 by name or dtype object."""
  if dtype is None:
    return None
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise SanaError(f"cannot save weights as {name}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def _host(array, name):
  if not getattr(array, "is_fully_addressable", True):
    raise SanaError(f"parameter {name} is sharded across processes; gather it to one host before saving")
  return np.asarray(array)


def _is_float(dtype):
  return np.dtype(dtype).kind == "f" or np.dtype(dtype) == DTYPES["bfloat16"]


def arrays(comp, dtype=None):
  """Yields (official name, contiguous numpy array) in entry order; each stacked parameter is
  brought to the host once. Floating arrays are cast to `dtype` (None keeps them as they are)."""
  dtype, cached = _dtype(dtype), (None, None)
  for e in comp.entries:
    if e.path is None:
      yield e.name, e.inverse(None)
      continue
    if cached[0] != e.path:
      cached = (e.path, _host(comp.state[e.path], e.name))
    w = e.inverse(cached[1] if e.layer is None else cached[1][e.layer])
    if dtype is not None and _is_float(w.dtype) and w.dtype != dtype:
      with np.errstate(over="ignore"):  # overflow is reported below, by name
        cast = w.astype(dtype)
      if dtype == DTYPES["float16"] and not np.isfinite(cast).all() and np.isfinite(w).all():
        raise SanaError(f"weight {e.name} overflows float16; save it as float32 or bfloat16")
      w = cast
    yield e.name, np.ascontiguousarray(w)


def state_dict(model, dtype=None):
  """{official name: numpy array} of a model, as its official loader expects it."""
  return dict(arrays(component(model, dtype), dtype))


def _shards(comp, dtype, max_bytes):
  """Entries split greedily into consecutive shards of at most max_bytes (one tensor may exceed it)."""
  def nbytes(e):
    stored = np.dtype(np.int64) if e.path is None else np.dtype(comp.state[e.path].dtype)
    return math.prod(e.shape) * (dtype.itemsize if dtype is not None and _is_float(stored) else stored.itemsize)

  shards, size = [[]], 0
  for e in comp.entries:
    n = nbytes(e)
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  return shards


def write_weights(directory, comp, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
  """<prefix>.safetensors, or numbered shards and <prefix>.safetensors.index.json, in `directory`."""
  from safetensors.numpy import save_file
  prefix = comp.weights_prefix
  shards = _shards(comp, _dtype(dtype), max_shard_bytes)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = (f"{prefix}.safetensors" if len(shards) == 1 else
            f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = dict(arrays(comp._replace(entries=shard), dtype))
    # transformers refuses safetensors files without this marker
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    total += sum(a.nbytes for a in tensors.values())
  if len(shards) > 1:
    _write_json(os.path.join(directory, f"{prefix}.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _fsync_tree(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        os.fsync(f.fileno())
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _replaceable(directory):
  """An existing directory may be replaced only when it is empty or holds a saved model."""
  if not os.path.isdir(directory):
    raise SanaError(f"cannot save to {directory}: it exists and is not a directory")
  names = set(os.listdir(directory))
  if names and not names & {"config.json", "model_index.json"}:
    raise SanaError(f"cannot save to {directory}: it is a non-empty directory that holds no saved model")


@contextlib.contextmanager
def atomic_directory(path):
  """`with atomic_directory(path) as tmp:` write into tmp, a fresh sibling of `path`; on success tmp
  becomes `path` by renames (an existing model directory is moved aside first, then deleted); on
  failure tmp is removed. A crash at any point leaves `path` absent or whole, never half-written."""
  path = os.path.abspath(os.fspath(path))
  parent, base = os.path.split(path)
  if os.path.lexists(path):
    _replaceable(path)
  os.makedirs(parent, exist_ok=True)
  tmp, old = (os.path.join(parent, f".{base}.{kind}-{uuid.uuid4().hex[:12]}") for kind in ("tmp", "old"))
  os.mkdir(tmp)  # not tempfile.mkdtemp: its 0o700 mode would stick to the published directory
  try:
    yield tmp
    _fsync_tree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(path):
    os.rename(path, old)
  os.rename(tmp, path)
  if os.path.islink(old):
    os.unlink(old)
  else:
    shutil.rmtree(old, ignore_errors=True)


def _write_component(directory, comp, dtype, max_shard_bytes):
  os.makedirs(directory, exist_ok=True)
  _write_json(os.path.join(directory, "config.json"), comp.config)
  write_weights(directory, comp, dtype, max_shard_bytes)


def save_pretrained(model, directory, dtype="float32", *, max_shard_bytes=MAX_SHARD_BYTES):
  """Writes `model` (SanaTransformer, DCAE or GemmaTextEncoder) as an official component directory:
  config.json and safetensors weights in `dtype` (float32, bfloat16, float16; None keeps each
  parameter's own dtype)."""
  comp = component(model, dtype)
  with atomic_directory(directory) as tmp:
    _write_component(tmp, comp, dtype, max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# a whole pipeline


# diffusers' saved configs of the two schedulers Sana's official repositories ship (defaults filled
# in, as diffusers writes them); `flow_shift` / `shift` is set from save_pipeline's argument
SCHEDULER_CONFIGS = {
    "DPMSolverMultistepScheduler": {
        "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero", "flow_shift": 3.0,
        "lambda_min_clipped": -math.inf, "lower_order_final": True, "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
        "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
        "time_shift_type": "exponential", "timestep_spacing": "linspace", "trained_betas": None,
        "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
        "use_flow_sigmas": True, "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None},
    "FlowMatchEulerDiscreteScheduler": {
        "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
        "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
        "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
        "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False},
}


def scheduler_config(scheduler="DPMSolverMultistepScheduler", flow_shift=3.0):
  """scheduler_config.json: a class name from SCHEDULER_CONFIGS (with `flow_shift`), or a complete
  config dict with its `_class_name`, written as given."""
  if isinstance(scheduler, dict):
    if scheduler.get("_class_name") not in SCHEDULER_CONFIGS:
      raise SanaError(f"scheduler config of class {scheduler.get('_class_name')!r}; "
                      f"expected one of {sorted(SCHEDULER_CONFIGS)}")
    return dict(scheduler)
  if scheduler not in SCHEDULER_CONFIGS:
    raise SanaError(f"scheduler {scheduler!r}; expected one of {sorted(SCHEDULER_CONFIGS)}")
  config = {**_diffusers_header(scheduler), **SCHEDULER_CONFIGS[scheduler]}
  config["flow_shift" if "flow_shift" in config else "shift"] = float(flow_shift)
  return config


def _write_tokenizer(directory, tokenizer):
  """Copies a tokenizer directory (or a pipeline's tokenizer/) or saves a transformers tokenizer;
  returns the class name model_index.json should give for it."""
  if isinstance(tokenizer, (str, os.PathLike)):
    src = os.fspath(tokenizer)
    if os.path.isdir(os.path.join(src, "tokenizer")):
      src = os.path.join(src, "tokenizer")
    if not os.path.isfile(os.path.join(src, "tokenizer_config.json")):
      raise SanaError(f"{tokenizer}: no tokenizer_config.json; expected a tokenizer directory")
    shutil.copytree(src, directory)
  else:
    tokenizer.save_pretrained(directory)
  with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
    name = json.load(f).get("tokenizer_class")
  if name is None:  # diffusers needs a class to call from_pretrained on: the one AutoTokenizer picks
    from sana_jax.text import load_tokenizer
    name = type(load_tokenizer(directory)).__name__
  return name


def save_pipeline(directory, *, transformer, vae, text_encoder, tokenizer, scheduler="DPMSolverMultistepScheduler",
                  flow_shift=3.0, dtype="float32", max_shard_bytes=MAX_SHARD_BYTES, settings=None):
  """Writes a diffusers-format Sana pipeline directory (model_index.json, transformer/, vae/,
  text_encoder/, tokenizer/, scheduler/) that diffusers' and our SanaPipeline.from_pretrained load.

  tokenizer: a transformers tokenizer, or a directory holding one (a pipeline directory works too).
  scheduler: "DPMSolverMultistepScheduler" (Flow-DPM-Solver) or "FlowMatchEulerDiscreteScheduler",
  set to `flow_shift`; or a full scheduler config dict (e.g. an official repository's), written as
  given. dtype: of every model's weights (see save_pretrained). settings: prompt encoding and sampling
  that differ from Sana's (max_sequence_length, complex_human_instruction, guidance_scale), kept under
  model_index.json's "sana_jax" key for our loader (diffusers ignores it: pass the same values to its
  __call__)."""
  comps = {"transformer": transformer_component(transformer), "vae": vae_component(vae),
           "text_encoder": gemma_component(text_encoder, dtype)}
  sched = scheduler_config(scheduler, flow_shift)
  with atomic_directory(directory) as tmp:
    index = {**_diffusers_header("SanaPipeline"), "scheduler": ["diffusers", sched["_class_name"]]}
    for name, comp in comps.items():
      _write_component(os.path.join(tmp, name), comp, dtype, max_shard_bytes)
      index[name] = [comp.library, comp.class_name]
    os.makedirs(os.path.join(tmp, "scheduler"))
    _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
    index["tokenizer"] = ["transformers", _write_tokenizer(os.path.join(tmp, "tokenizer"), tokenizer)]
    if settings:
      index["sana_jax"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(settings).items()}
    _write_json(os.path.join(tmp, "model_index.json"), index)
