"""diffusers / peft LoRA files for the Sana transformer <-> sana_jax.lora adapters.

A file holds `transformer.<module>.lora_A.weight` [r, in(, kh, kw)] and `.lora_B.weight` [out, r(, 1, 1)]
for modules of diffusers' SanaTransformer2DModel; the module's own weight row in diffusers_dit.TABLE
says where its kernel lives here and how the factors map (diffusers_dit.LORA_FACTORS). The scale of a
module is alpha / r (alpha / sqrt(r) with use_rslora), alpha read as diffusers reads it: the peft config
in the header's `lora_adapter_metadata` (lora_alpha, alpha_pattern), else `<module>.alpha` keys (kohya's
files; diffusers refuses those for Sana), else alpha = r.
"""
import json
import math
import os
import re
from typing import NamedTuple

import numpy as np

from sana_jax import files
from sana_jax import lora as L
from sana_jax.convert import diffusers_dit, safetensors_io
from sana_jax.errors import SanaError, short

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer."
MAX_RANK = 4096


class Module(NamedTuple):
  """A diffusers module whose weight LoRA can adapt, and where that weight lives here."""
  path: tuple
  layer: int | None
  transform: object   # the kernel's Transform (a key of diffusers_dit.LORA_FACTORS)
  kernel_shape: tuple  # without the layers axis


def modules(cfg, shapes):
  """({module name: Module} LoRA can adapt, {module name: why not} for the other weights) of a
  transformer with config `cfg` and flat param shapes {path: shape struct}."""
  ok, refused = {}, {}
  for e in diffusers_dit.export_plan(cfg, shapes):
    if not e.name.endswith(".weight"):
      continue
    name = e.name[:-len(".weight")]
    if e.transform in diffusers_dit.LORA_FACTORS:
      ok[name] = Module(e.path, e.layer, e.transform, tuple(e.shape))
    else:
      refused[name] = f"its {e.transform.name} weight is not a linear or 1x1 convolution"
  return ok, refused


def targets(cfg, shapes):
  """Every adaptable module as a sana_jax.lora.Target, and the refused ones (for config errors)."""
  ok, refused = modules(cfg, shapes)
  return [L.Target(m.path, m.layer, name) for name, m in ok.items()], refused


# ---- reading


def resolve_file(path, weight_name=None):
  """The LoRA file of a directory (local, or a hub id fetched when online) or file path."""
  from sana_jax.convert import pipelines
  path = os.fspath(path)
  if not os.path.lexists(path) and pipelines.looks_like_hub_id(path):
    path = pipelines.resolve_model(path)
  if os.path.isdir(path):
    return files.inside(path, weight_name or WEIGHT_NAME, "LoRA weights file")
  if not os.path.lexists(path):
    raise SanaError(f"LoRA {path}: no such file or directory (a directory holding {WEIGHT_NAME}, or a .safetensors "
                    f"file)")
  return path


def parse_specs(specs, flag="--lora"):
  """[(path, scale)] from command-line PATH[:SCALE] values (scale 1.0 when absent); each file's header
  is validated here, before any model loads (its tensors are checked against the model on loading)."""
  out = []
  for spec in specs:
    path, _, tail = spec.rpartition(":")
    try:
      scale = float(tail) if path else 1.0
    except ValueError:
      path, scale = spec, 1.0  # a colon inside the path
    path = path or spec
    if not math.isfinite(scale):
      raise SanaError(f"{flag} {short(spec, 80)}: the scale must be a finite number")
    safetensors_io.read_header(resolve_file(path))
    out.append((path, scale))
  return out


def read(path, cfg, shapes, *, weight_name=None, num_layers=None):
  """The adapter {params path: LoraFactors (numpy float32)} in a diffusers / peft LoRA file, or in a
  state dict {key: array} given instead of a path (alpha = rank, as diffusers without metadata)."""
  if isinstance(path, dict):
    tensors, metadata, path = {str(k): np.asarray(v) for k, v in path.items()}, {}, "LoRA state dict"
  else:
    path = resolve_file(path, weight_name)
    _, metadata, _ = safetensors_io.read_header(path)
    tensors = safetensors_io.read_file(path)
  config = _peft_config(metadata, path)
  ok, refused = modules(cfg, shapes)
  parts = _group(tensors, path)
  per_path = {}
  for name, part in sorted(parts.items()):
    where = f"{path}: {PREFIX}{name}"
    module = ok.get(name)
    if module is None:
      why = refused.get(name, "the transformer has no such linear layer")
      raise SanaError(f"{where}: LoRA cannot be applied here ({why})")
    if "A" not in part or "B" not in part:
      raise SanaError(f"{where}: has lora_{'A' if 'B' in part else 'B'} but not lora_{'B' if 'B' in part else 'A'}")
    down, up, rank = _factors(part["A"], part["B"], module, where)
    alpha = _alpha(name, rank, config, part.get("alpha"), where)
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    per_path.setdefault(module.path, []).append((module.layer, down, up, scale))
  layers = cfg.num_layers if num_layers is None else num_layers
  return {p: _stack(items, layers) for p, items in per_path.items()}


def _group(tensors, path):
  """{module: {"A": array, "B": array, "alpha": float}} by key suffix; other keys are errors."""
  parts = {}
  for key, array in tensors.items():
    where = f"{path}: key {short(key)}"
    if not key.startswith(PREFIX):
      raise SanaError(f"{where}: not a transformer LoRA key (sana-jax applies `{PREFIX}...` LoRA only)")
    name = key[len(PREFIX):]
    if "lora_magnitude_vector" in name or "dora_scale" in name:
      raise SanaError(f"{where}: DoRA adapters are not supported")
    m = re.fullmatch(r"(.+)\.(?:lora_(A|B)\.weight|(alpha))", name)
    if m is None:
      what = "LoRA biases (lora_bias) are not supported" if name.endswith(".lora_B.bias") else "unknown LoRA key"
      raise SanaError(f"{where}: {what}")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise SanaError(f"{where}: dtype {array.dtype}; expected floating point")
    value = np.asarray(array, np.float32)
    if not np.isfinite(value).all():
      raise SanaError(f"{where}: holds NaN or infinite values")
    slot = parts.setdefault(m.group(1), {})
    if m.group(3):
      if value.size != 1 or not value.reshape(()) > 0:
        raise SanaError(f"{where}: alpha must be one positive number")
      slot["alpha"] = float(value.reshape(()))
    else:
      slot[m.group(2)] = value
  if not parts:
    raise SanaError(f"{path}: holds no LoRA weights")
  return parts


def _factors(a, b, module, where):
  down_t, up_t = diffusers_dit.LORA_FACTORS[module.transform]
  rank = a.shape[0] if a.ndim else 0
  conv = len(a.shape) == 4
  if (a.ndim not in (2, 4) or b.ndim != a.ndim or not 0 < rank <= MAX_RANK or b.shape[1] != rank
      or (conv and b.shape[2:] != (1, 1))):
    raise SanaError(f"{where}: lora_A {a.shape} and lora_B {b.shape} are not the factors of one LoRA "
                    f"(A [r, in(, kh, kw)], B [out, r(, 1, 1)])")
  try:
    down, up = down_t.forward(a), up_t.forward(b)
  except ValueError:
    down = up = None
  din, dout = module.kernel_shape[0], module.kernel_shape[1:]
  if down is None or down.shape != (din, rank) or up.shape != (rank, *dout):
    raise SanaError(f"{where}: lora_A {a.shape} / lora_B {b.shape} do not fit its weight (kernel "
                    f"{module.kernel_shape} here)")
  return np.ascontiguousarray(down), np.ascontiguousarray(up), rank


def _peft_config(metadata, path):
  """The adapter's peft LoraConfig fields from the header (`transformer.`-prefixed as diffusers saves
  them, or bare), checked; {} when the file has none."""
  raw = metadata.get(METADATA_KEY)
  if raw is None:
    return {}
  try:
    config = json.loads(raw)
  except (json.JSONDecodeError, RecursionError):
    raise SanaError(f"{path}: {METADATA_KEY} in the header is not valid JSON") from None
  if not isinstance(config, dict):
    raise SanaError(f"{path}: {METADATA_KEY} must be a JSON object")
  if any(k.startswith(PREFIX) for k in config):
    config = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
  checks = {"r": number, "lora_alpha": number, "use_rslora": lambda v: isinstance(v, bool),
            "rank_pattern": lambda v: isinstance(v, dict) and all(map(number, v.values())),
            "alpha_pattern": lambda v: isinstance(v, dict) and all(map(number, v.values()))}
  for key, ok in checks.items():
    if config.get(key) is not None and not ok(config[key]):
      raise SanaError(f"{path}: {METADATA_KEY}: {key} = {short(config[key], 60)} is not valid")
  if config.get("use_dora"):
    raise SanaError(f"{path}: a DoRA adapter (use_dora); DoRA is not supported")
  if config.get("lora_bias"):
    raise SanaError(f"{path}: an adapter with LoRA biases (lora_bias); those are not supported")
  return config


def _pattern_value(patterns, module):
  """peft's rank_pattern / alpha_pattern lookup: the key equal to the module name, else the first key
  that, as a regex, matches a dot-bounded tail of it."""
  if module in patterns:
    return patterns[module]
  for key, value in patterns.items():
    try:
      if re.match(rf"(.*\.)?({key})$", module):
        return value
    except re.error:
      raise SanaError(f"LoRA metadata: pattern {short(key)} is not a valid regex") from None
  return None


def _alpha(module, rank, config, alpha_key, where):
  if not config:
    return rank if alpha_key is None else alpha_key
  r = _pattern_value(config.get("rank_pattern") or {}, module) or config.get("r")
  if r is not None and r != rank:
    raise SanaError(f"{where}: the metadata gives rank {r}, the weights {rank}")
  alpha = _pattern_value(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha")
  return rank if alpha is None else alpha


def _stack(items, num_layers):
  """One module's (layer, down, up, scale) items -> LoraFactors; layered ones stacked over all layers."""
  if items[0][0] is None:
    _, down, up, scale = items[0]
    return L.LoraFactors(down, up, np.float32(scale))
  rank = max(down.shape[1] for _, down, _, _ in items)
  din, dout = items[0][1].shape[0], items[0][2].shape[1:]
  downs = np.zeros((num_layers, din, rank), np.float32)
  ups = np.zeros((num_layers, rank, *dout), np.float32)
  scales = np.zeros(num_layers, np.float32)
  for layer, down, up, scale in items:
    r = down.shape[1]
    downs[layer, :, :r], ups[layer, :r], scales[layer] = down, up, scale
  return L.LoraFactors(downs, ups, scales)


# ---- writing


def state_dict(adapter, cfg, shapes, *, dtype=np.float32):
  """{diffusers key: array} of an adapter, one entry pair per adapted layer (scale != 0). All its
  modules must share one scale per rank (the file carries one alpha); returns (tensors, alpha, rank)."""
  by_path = {}
  for name, m in modules(cfg, shapes)[0].items():
    by_path[(m.path, m.layer)] = (name, m)
  tensors, ranks, alphas = {}, set(), set()
  for path, f in adapter.items():
    down, up, scale = (np.asarray(a, np.float32) for a in f)
    layers = [None] if down.ndim == 2 else range(down.shape[0])
    for layer in layers:
      s = scale if layer is None else scale[layer]
      if s == 0:
        continue
      name, m = by_path[(path, layer)]
      d, u = (down, up) if layer is None else (down[layer], up[layer])
      down_t, up_t = diffusers_dit.LORA_FACTORS[m.transform]
      tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(down_t.inverse(d, cfg)).astype(dtype)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(up_t.inverse(u, cfg)).astype(dtype)
      ranks.add(d.shape[1])
      alphas.add(float(s) * d.shape[1])
  if len(ranks) != 1 or len(alphas) != 1:
    raise SanaError("cannot save an adapter whose layers differ in rank or alpha as one diffusers LoRA file")
  return tensors, alphas.pop(), ranks.pop()


def save(directory, adapter, cfg, shapes, *, dtype=np.float32):
  """DIR/pytorch_lora_weights.safetensors with diffusers' keys and the peft config in the header
  (what diffusers' SanaPipeline.save_lora_weights writes), loadable by its load_lora_weights."""
  from sana_jax.convert import writing
  tensors, alpha, rank = state_dict(adapter, cfg, shapes, dtype=dtype)
  alpha = int(alpha) if float(alpha).is_integer() else alpha
  names = sorted({key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in tensors})
  config = {"r": rank, "lora_alpha": alpha, "target_modules": names, "rank_pattern": {}, "alpha_pattern": {},
            "use_rslora": False, "use_dora": False, "lora_bias": False, "lora_dropout": 0.0,
            "init_lora_weights": True, "peft_type": "LORA"}
  header = {"format": "pt", METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()}, indent=2,
                                                     sort_keys=True)}
  with files.atomic_directory(directory, _holds_lora) as tmp:
    writing.save_safetensors(os.path.join(tmp, WEIGHT_NAME), tensors, header)
  return os.path.join(directory, WEIGHT_NAME)


def _holds_lora(directory):
  """An existing --out may be replaced only when empty or holding a LoRA file."""
  if os.listdir(directory) and not os.path.exists(os.path.join(directory, WEIGHT_NAME)):
    raise SanaError(f"cannot save to {directory}: it is a non-empty directory that holds no {WEIGHT_NAME}")
