"""Kernels with an XLA reference beside each (imported as `sana_jax.kernels`)."""
from sana_jax.kernels.linear_attention import linear_attention, linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference"]
