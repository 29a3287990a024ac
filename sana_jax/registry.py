"""Where diffusers' class names meet ours: the one place a new family member registers.

PIPELINES maps model_index.json's `_class_name` to our pipeline class and the samplers its scheduler
may select; SCHEDULERS maps a scheduler_config.json's `_class_name` to our sampler, the fields it
reads (and the pipeline keyword each becomes), the values of fields that change the sampler's
arithmetic (anything else is refused, not silently ignored), and the config diffusers saves for it
(defaults filled in; what export writes). Loading (`sana_jax.pipeline.load_pipeline`, sample.py) and
saving (`sana_jax.convert.pipelines`) both read these tables.
"""
import importlib
import math
from typing import NamedTuple

from sana_jax import fields as F
from sana_jax.errors import SanaError, short


class Pipeline(NamedTuple):
  target: str         # "module:class" (imported on first use: sample.py reads this table before JAX is imported)
  samplers: tuple     # the samplers its scheduler may select


_FLOW = ("flow_dpm", "flow_euler")
# model_index.json `_class_name` -> our pipeline
PIPELINES = {
    "SanaPipeline": Pipeline("sana_jax.pipeline:SanaPipeline", _FLOW),
    "SanaPAGPipeline": Pipeline("sana_jax.pipeline:SanaPipeline", _FLOW),  # PAG is a call argument of ours
    "SanaControlNetPipeline": Pipeline("sana_jax.pipeline:SanaControlNetPipeline", _FLOW),
    "SanaSprintPipeline": Pipeline("sana_jax.sprint:SanaSprintPipeline", ("scm",)),
    # image= is a call argument of ours
    "SanaSprintImg2ImgPipeline": Pipeline("sana_jax.sprint:SanaSprintPipeline", ("scm",)),
}


class Scheduler(NamedTuple):
  sampler: str        # a key of sana_jax.sampling.SAMPLERS, or "scm" (Sana-Sprint)
  settings: dict      # {field: the pipeline keyword its value becomes}
  requires: dict      # {field: the only value our sampler implements}
  saved: dict         # diffusers' saved config (defaults filled in), without _class_name / version


SCHEDULERS = {
    "DPMSolverMultistepScheduler": Scheduler(
        "flow_dpm", {"flow_shift": "flow_shift"},
        requires={"prediction_type": "flow_prediction", "use_flow_sigmas": True, "algorithm_type": "dpmsolver++",
                  "solver_order": 2, "final_sigmas_type": "zero", "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_dynamic_shifting": False},
        saved={
            "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
            "flow_shift": 3.0, "lambda_min_clipped": -math.inf, "lower_order_final": True,
            "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
            "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
            "thresholding": False, "time_shift_type": "exponential", "timestep_spacing": "linspace",
            "trained_betas": None, "use_beta_sigmas": False, "use_dynamic_shifting": False,
            "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
            "use_lu_lambdas": False, "variance_type": None}),
    "FlowMatchEulerDiscreteScheduler": Scheduler(
        "flow_euler", {"shift": "flow_shift"},
        requires={"use_dynamic_shifting": False, "invert_sigmas": False, "stochastic_sampling": False,
                  "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "shift_terminal": None},
        saved={
            "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
            "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
            "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
            "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False}),
    "SCMScheduler": Scheduler(
        "scm", {"sigma_data": "sigma_data"},
        requires={"prediction_type": "trigflow"},
        saved={"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}),
}
# the pipeline keywords scheduler settings become, each checked
SETTING_CHECKS = {"flow_shift": F.real(hi=1000, above=0), "sigma_data": F.real(hi=1000, above=0)}


def scheduler_settings(config, source="scheduler_config.json"):
  """{"sampler": name, keyword: value} for a scheduler config dict (flow_shift for the flow samplers,
  sigma_data for sCM); a SanaError for anything we would run differently from diffusers."""
  name = config.get("_class_name")
  if not isinstance(name, str) or name not in SCHEDULERS:
    raise SanaError(f"{source}: scheduler {short(name)} is not supported; expected one of {', '.join(SCHEDULERS)}")
  scheduler = SCHEDULERS[name]
  for key, value in scheduler.requires.items():
    if key in config and config[key] != value:
      raise SanaError(f"{source}: {key} = {short(config[key], 40)} is not supported by sana-jax's {name} "
                      f"(it implements {value!r})")
  settings = {}
  for key, keyword in scheduler.settings.items():
    settings[keyword] = F.validate({key: config.get(key, scheduler.saved[key])}, {key: SETTING_CHECKS[keyword]},
                                   source)[key]
  return dict(sampler=scheduler.sampler, **settings)


def scheduler_for(sampler):
  """The scheduler class name a sampler is saved as."""
  names = [name for name, s in SCHEDULERS.items() if s.sampler == sampler]
  if not names:
    raise SanaError(f"sampler {short(sampler)} has no diffusers scheduler; expected one of "
                    f"{', '.join(s.sampler for s in SCHEDULERS.values())}")
  return names[0]


def pipeline_class(name, source="model_index.json"):
  """Our pipeline class for a model_index.json `_class_name`."""
  if not isinstance(name, str) or name not in PIPELINES:
    raise SanaError(f"{source}: pipeline class {short(name)} is not supported; expected one of "
                    f"{', '.join(PIPELINES)}")
  module, cls = PIPELINES[name].target.split(":")
  return getattr(importlib.import_module(module), cls)


def check_pairing(pipeline, sampler, source="model_index.json"):
  """A SanaPipeline directory needs a flow scheduler, a Sprint one SCMScheduler."""
  allowed = PIPELINES[pipeline].samplers
  if sampler not in allowed:
    names = [name for name, s in SCHEDULERS.items() if s.sampler in allowed]
    raise SanaError(f"{source}: a {pipeline} samples with {' or '.join(names)}, but its scheduler is "
                    f"{scheduler_for(sampler)}")
