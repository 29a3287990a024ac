"""JAX's persistent compilation cache for the command-line entry points: one compile per shape, ever."""
import os


def enable_compilation_cache():
  """Caches compiled programs under $XDG_CACHE_HOME/sana-jax/xla, unless a cache directory is already
  configured (JAX_COMPILATION_CACHE_DIR, as the tests set)."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sana-jax", "xla")
  try:
    os.makedirs(cache, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  except OSError:
    pass  # a read-only home: compile every time
