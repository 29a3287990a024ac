"""sana-jax: NVIDIA's Sana text-to-image system in JAX/Flax NNX.

The public classes import on first use, so `import sana_jax.files` (sample.py's argument checks) does
not pull in JAX."""
import importlib

from sana_jax.errors import SanaError  # noqa: F401 - public, and light enough to import eagerly

_PUBLIC = {
    "DCAE": "sana_jax.models.dcae", "DCAEConfig": "sana_jax.models.dcae",
    "GemmaConfig": "sana_jax.models.gemma", "GemmaTextEncoder": "sana_jax.models.gemma",
    "SanaTransformer": "sana_jax.models.dit", "SanaTransformerConfig": "sana_jax.models.dit",
    "SanaControlNetModel": "sana_jax.models.controlnet",
    "SanaPipeline": "sana_jax.pipeline", "load_pipeline": "sana_jax.pipeline",
    "SanaControlNetPipeline": "sana_jax.pipeline",
    "SanaSprintPipeline": "sana_jax.sprint",
}
__all__ = sorted([*_PUBLIC, "SanaError"])
__version__ = "0.1.0"


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'sana_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
