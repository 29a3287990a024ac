"""diffusers-format pipeline directories: model_index.json, its components, read and written.

  model_index.json   _class_name (registry.PIPELINES), one [library, class] per component, and our own
                     "sana_jax" settings (prompt encoding, default guidance scale) where they differ
  transformer/ vae/ text_encoder/   config.json + safetensors (the per-model converters)
  tokenizer/         a transformers tokenizer
  scheduler/         scheduler_config.json (registry.SCHEDULERS)

Every path is resolved inside the directory (no `..`, no absolute paths, no symlinks out of it) and
every JSON file is validated before a model is built.
"""
import os
import re
import shutil

from sana_jax import dtypes, files, registry, text
from sana_jax import fields as F
from sana_jax.convert import diffusers_controlnet, diffusers_dcae, diffusers_dit, transformers_gemma, writing
from sana_jax.errors import SanaError, one_line, short

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# model_index.json "sana_jax": settings a directory may override, each checked
SETTINGS = {
    "max_sequence_length": F.integer(2, text.MAX_SEQUENCE_LENGTH),
    "complex_human_instruction": F.sequence(F.text(4000), max_len=64),
    "guidance_scale": F.real(0, 1000),
}
TEXT_SETTINGS = ("max_sequence_length", "complex_human_instruction")  # the prompt-encoding ones
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def looks_like_hub_id(path):
  """`org/name` with nothing on disk by that name: what resolve_model sends to the hub."""
  return not os.path.lexists(path) and bool(_HUB_ID.fullmatch(path)) and not path.startswith(".")


def resolve_model(path_or_id):
  """A local directory as it is; a hub id (`org/name`, nothing on disk by that name) fetched when
  online. Anything that looks like a path is never sent to the hub."""
  path = os.fspath(path_or_id)
  if os.path.isdir(path):
    return path
  if not looks_like_hub_id(path):
    why = "is not a directory" if os.path.lexists(path) else "does not exist"
    raise SanaError(f"model directory {short(path, 200)} {why}")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path)
  except Exception as e:  # noqa: BLE001 - offline, unknown id, no access: all the user's to fix
    raise SanaError(f"cannot fetch model {path!r} from the hub: {one_line(e, 200) or type(e).__name__}") from None


def read_model_index(path):
  """model_index.json, validated: a known pipeline class, every component named, our settings checked."""
  index_path = files.inside(path, "model_index.json")
  if not os.path.lexists(index_path):
    raise SanaError(f"{path}: no model_index.json; expected a diffusers-format Sana directory")
  index = files.read_json(index_path, "model_index.json")
  if not isinstance(index.get("_class_name"), str) or index["_class_name"] not in registry.PIPELINES:
    raise SanaError(f"{index_path}: pipeline class {short(index.get('_class_name'))} is not supported; "
                    f"expected one of {', '.join(registry.PIPELINES)}")
  for name in COMPONENTS:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
      raise SanaError(f"{index_path}: {name} must be a [library, class] pair, got {short(entry)}")
  index["sana_jax"] = _settings(index, index_path)
  return index


def _settings(index, index_path):
  settings = index.get("sana_jax", {})
  if not isinstance(settings, dict):
    raise SanaError(f"{index_path}: \"sana_jax\" must be an object of settings")
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise SanaError(f"{index_path}: unknown sana_jax setting(s) {short(unknown)}")
  return F.validate(settings, SETTINGS, index_path)


def model_settings(path):
  """Settings a directory's model_index.json overrides ("sana_jax"); {} for official checkpoints and
  for a directory without one. The shipped demo model uses no complex human instruction, short
  captions, and its own default guidance scale (the one its alignment scores best at)."""
  index_path = files.inside(path, "model_index.json")
  if not os.path.lexists(index_path):
    return {}
  return _settings(files.read_json(index_path, "model_index.json"), index_path)


def read_scheduler(path):
  """{"sampler": name, and its settings as pipeline keywords} of a pipeline directory's
  scheduler/scheduler_config.json (registry.scheduler_settings)."""
  config_path = files.inside(path, os.path.join("scheduler", "scheduler_config.json"), "scheduler config")
  return registry.scheduler_settings(files.read_json(config_path, "scheduler config"), config_path)


def component_dir(path, name):
  """path/name, a directory inside the pipeline directory."""
  sub = files.inside(path, name, "component")
  if not os.path.isdir(sub):
    raise SanaError(f"{path}: component directory {name}/ is missing")
  return sub


def load_tokenizer(path):
  """The tokenizer in a local directory: regular files only (never a FIFO that hangs), never the hub."""
  for entry in os.scandir(path):
    files.inside(path, entry.name, "tokenizer file")
    if not (entry.is_file() or entry.is_dir()):
      raise SanaError(f"{path}/{entry.name} is not a regular file")
  return text.load_tokenizer(path)


def check(path):
  """Validates a pipeline directory's JSON files and component directories without building a model:
  for command lines, to fail in a second before anything heavy is imported. Returns its configs."""
  index = read_model_index(path)
  configs = dict(index=index, scheduler=read_scheduler(path))
  registry.check_pairing(index["_class_name"], configs["scheduler"]["sampler"], files.inside(path, "model_index.json"))
  configs["transformer"] = diffusers_dit.read_config(component_dir(path, "transformer"))[1]
  configs["vae"] = diffusers_dcae.read_config(component_dir(path, "vae"))[1]
  configs["text_encoder"] = transformers_gemma.read_config(component_dir(path, "text_encoder"))[1]
  component_dir(path, "tokenizer")
  return configs


def load_components(path, dtype="float32", *, transformer=True):
  """The pipeline's parts from a diffusers-format directory (or hub id), as SanaPipeline keywords;
  transformer=False leaves the DiT out (training samples with the model being trained)."""
  path = resolve_model(path)
  dtype = dtypes.resolve(dtype)
  index = read_model_index(path)
  scheduler = read_scheduler(path)
  registry.check_pairing(index["_class_name"], scheduler["sampler"], files.inside(path, "model_index.json"))
  parts = dict(tokenizer=load_tokenizer(component_dir(path, "tokenizer")),
               text_encoder=transformers_gemma.load(component_dir(path, "text_encoder"), dtype=dtype,
                                                    param_dtype=dtype),
               vae=diffusers_dcae.load(component_dir(path, "vae"), dtype=dtype, param_dtype=dtype),
               **scheduler, **index["sana_jax"])
  if transformer:
    parts["transformer"] = diffusers_dit.load(component_dir(path, "transformer"), dtype=dtype, param_dtype=dtype)
  return parts


# ---------------------------------------------------------------------------------------------
# writing


def scheduler_config(scheduler="DPMSolverMultistepScheduler", flow_shift=3.0, sigma_data=None):
  """scheduler_config.json: a class name from registry.SCHEDULERS (with `flow_shift`, or sCM's
  `sigma_data`, where that scheduler reads it), or a complete config dict with its `_class_name`,
  written as given."""
  if isinstance(scheduler, dict):
    registry.scheduler_settings(scheduler, "scheduler config")
    return dict(scheduler)
  if scheduler not in registry.SCHEDULERS:
    raise SanaError(f"scheduler {short(scheduler)}; expected one of {', '.join(registry.SCHEDULERS)}")
  entry = registry.SCHEDULERS[scheduler]
  given = dict(flow_shift=flow_shift, sigma_data=sigma_data)
  ours = {key: float(given[keyword]) for key, keyword in entry.settings.items() if given[keyword] is not None}
  return {**writing.library_header(scheduler), **entry.saved, **ours}


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
  name = files.read_json(os.path.join(directory, "tokenizer_config.json"), "tokenizer config").get("tokenizer_class")
  if name is None:  # diffusers needs a class to call from_pretrained on: the one AutoTokenizer picks
    name = type(load_tokenizer(directory)).__name__
  return name


def save_pipeline(directory, *, transformer, vae, text_encoder, tokenizer, scheduler="DPMSolverMultistepScheduler",
                  flow_shift=3.0, sigma_data=None, dtype="float32", max_shard_bytes=writing.MAX_SHARD_BYTES,
                  settings=None, pipeline_class="SanaPipeline", controlnet=None):
  """Writes a diffusers-format Sana pipeline directory (model_index.json, transformer/, vae/,
  text_encoder/, tokenizer/, scheduler/) that diffusers' and our `pipeline_class` (a key of
  registry.PIPELINES) load.

  tokenizer: a transformers tokenizer, or a directory holding one (a pipeline directory works too).
  scheduler: "DPMSolverMultistepScheduler" (Flow-DPM-Solver) or "FlowMatchEulerDiscreteScheduler",
  set to `flow_shift`, or "SCMScheduler" (Sana-Sprint) with `sigma_data`; or a full scheduler config
  dict (e.g. an official repository's), written as given. dtype: of every model's weights (see
  writing.save_pretrained). settings: prompt encoding and sampling that differ from Sana's
  (max_sequence_length, complex_human_instruction, guidance_scale), kept under model_index.json's
  "sana_jax" key for our loader (diffusers ignores it: pass the same values to its __call__).
  pipeline_class: the model_index.json class (a key of registry.PIPELINES). controlnet: the
  SanaControlNetModel of a SanaControlNetPipeline (its controlnet/)."""
  if (controlnet is None) == (pipeline_class == "SanaControlNetPipeline"):
    raise SanaError("a SanaControlNetPipeline is saved with its controlnet, and no other pipeline has one")
  comps = {"transformer": diffusers_dit.component(transformer), "vae": diffusers_dcae.component(vae),
           "text_encoder": transformers_gemma.component(text_encoder, dtype)}
  if controlnet is not None:
    comps["controlnet"] = diffusers_controlnet.component(controlnet)
  sched = scheduler_config(scheduler, flow_shift, sigma_data)
  registry.pipeline_class(pipeline_class, "pipeline_class")
  settings = F.validate(dict(settings or {}), SETTINGS, "settings")
  with files.atomic_directory(directory, writing.holds_saved_model) as tmp:
    index = {**writing.library_header(pipeline_class), "scheduler": ["diffusers", sched["_class_name"]]}
    for name, comp in comps.items():
      writing.write_component(os.path.join(tmp, name), comp, dtype, max_shard_bytes)
      index[name] = [comp.library, comp.class_name]
    os.makedirs(os.path.join(tmp, "scheduler"))
    files.write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched, sort_keys=True)
    index["tokenizer"] = ["transformers", _write_tokenizer(os.path.join(tmp, "tokenizer"), tokenizer)]
    if settings:
      index["sana_jax"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    files.write_json(os.path.join(tmp, "model_index.json"), index, sort_keys=True)
