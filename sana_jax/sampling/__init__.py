"""Samplers as pure functions: flow-matching schedules (numpy, built once) and solver steps (jax), and
Sana-Sprint's sCM steps (scm)."""
from sana_jax.sampling.schedules import flow_dpm_schedule, flow_euler_schedule
from sana_jax.sampling.solvers import SAMPLERS, denoise

__all__ = ["SAMPLERS", "denoise", "flow_dpm_schedule", "flow_euler_schedule"]
