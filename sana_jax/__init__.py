"""sana-jax: NVIDIA's Sana text-to-image system in JAX/Flax NNX."""
from sana_jax.errors import SanaError
from sana_jax.models.dcae import DCAE, DCAEConfig
from sana_jax.models.gemma import GemmaConfig, GemmaTextEncoder
from sana_jax.models.dit import SanaTransformer, SanaTransformerConfig
from sana_jax.pipeline import SanaPipeline

__all__ = ["DCAE", "DCAEConfig", "GemmaConfig", "GemmaTextEncoder", "SanaError", "SanaPipeline", "SanaTransformer", "SanaTransformerConfig"]
__version__ = "0.1.0"
