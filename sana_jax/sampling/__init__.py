"""Flow-matching samplers as pure functions: schedules (numpy, built once) and solver steps (jax)."""
from sana_jax.sampling.schedules import flow_dpm_schedule, flow_euler_schedule
from sana_jax.sampling.solvers import SAMPLERS, denoise

__all__ = ["SAMPLERS", "denoise", "flow_dpm_schedule", "flow_euler_schedule"]
