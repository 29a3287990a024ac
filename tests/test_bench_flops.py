"""The MAC counter the benchmarks use to turn times into TFLOP/s."""
import jax
import jax.numpy as jnp

from bench.flops import count_macs


def test_counts_matmuls_convs_and_scans():
  a, b = jnp.zeros((3, 5, 7)), jnp.zeros((7, 11))
  assert count_macs(lambda a, b: a @ b, a, b) == 3 * 5 * 7 * 11
  x, k = jnp.zeros((2, 8, 6, 4)), jnp.zeros((3, 3, 4, 10))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert count_macs(conv, x, k) == 2 * 8 * 6 * 10 * 9 * 4
  dw = jnp.zeros((3, 3, 1, 4))
  grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                      feature_group_count=4)
  assert count_macs(grouped, x, dw) == 2 * 8 * 6 * 4 * 9
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=4)[1]
  assert count_macs(scanned, a, b) == 4 * 3 * 5 * 7 * 11
