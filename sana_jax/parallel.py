"""Device meshes and logical-axis rules: the only module that names physical mesh axes.

Models label every weight dimension with a logical name ("embed", "heads", "mlp", "layers", ...);
`rules` map each logical name to a mesh axis (or None = replicated). A dimension whose size the
mesh axis does not divide stays replicated, and a mesh axis is used at most once per array.
"""
import contextlib
import contextvars
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sana_jax.errors import SanaError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),        # model width of weights: ZeRO-3 style parameter sharding
    ("embed_out", "tensor"),  # the second width axis of a D x D projection
    ("heads", "tensor"),      # attention inner dims (head-major, so heads split cleanly)
    ("mlp", "tensor"),        # Mix-FFN hidden channels
    ("vocab", "tensor"),      # text-encoder embedding rows
    ("caption", None),
    ("patch", None),
    ("layers", None),         # the scanned axis of stacked block params
    ("seq", None),            # image tokens (latent rows first): whole in training
    ("rows", None),           # image rows of the DC-AE's activations
)

# Sampling: weights replicated; "data" splits the batch rows (prompts, and the CFG halves: cfg-parallel), "fsdp"
# the image's latent rows (sequence parallelism); the DC-AE decode splits its rows over every device.
SAMPLING_RULES = (("batch", "data"), ("seq", "fsdp"), ("rows", None))
ROW_AXES = ("seq", "rows")  # the logical names of split image rows: the DiT's tokens, the DC-AE's rows
DECODE_RULES = (("batch", None), ("seq", None), ("rows", MESH_AXES))


def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
  """Mesh over ("data", "fsdp", "tensor"); one size may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise SanaError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise SanaError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor={known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise SanaError(f"mesh: data*fsdp*tensor={math.prod(sizes)} but there are {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


PARALLELISMS = ("auto", "batch", "cfg", "sequence")
SEQUENCE_ABOVE = 64 * 64  # latent tokens per image from which "auto" splits images rather than the batch


def sampling_devices(devices=None):
  """A pipeline's devices: all of the run's (None: the local ones, or every process's after
  jax.distributed.initialize), the first `devices` local ones (an int), or a list."""
  local = jax.local_devices()
  if devices is None:
    return jax.devices()
  if isinstance(devices, int) and not isinstance(devices, bool):
    if not 1 <= devices <= len(local):
      raise SanaError(f"devices={devices}: this process has {len(local)} local device(s)")
    return local[:devices]
  devices = list(devices)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise SanaError("devices: give None, a count, or a non-empty list of jax devices")
  return devices


def sampling_plan(parallelism, devices, *, rows, groups, token_rows, tokens):
  """(batch ways, sequence ways) for sampling on `devices`: the model batch of `rows` rows (`groups` copies of
  the images: CFG halves, PAG thirds) split `batch ways` times, each image's `token_rows` rows of latent tokens
  `sequence ways` times; their product is `devices`, or (1, 1) for one device.

  "batch": rows over every device (one device when they do not divide). "sequence": token rows over every
  device. "cfg": the groups over device groups, token rows within each (cfg x sequence). "auto": for images of
  at least SEQUENCE_ABOVE tokens the most batch ways that leave the token rows divisible by the rest (batch x
  sequence, CFG halves included: the batch split needs no communication); smaller images "batch"."""
  n = devices
  batch = (n, 1) if rows % n == 0 else (1, 1)
  sequence = (1, n) if token_rows % n == 0 else None
  cfg = (groups, n // groups) if groups > 1 and n % groups == 0 and token_rows % (n // groups) == 0 else None
  if n == 1 or parallelism == "batch":
    return batch
  if parallelism == "sequence":
    if sequence is None:
      raise SanaError(f"parallelism='sequence' splits the {token_rows} rows of latent tokens over {n} devices: "
                      f"choose a height whose rows divide by {n}")
    return sequence
  if parallelism == "cfg":
    if cfg is None:
      raise SanaError(f"parallelism='cfg' needs guidance (2 or 3 batch groups) dividing the {n} devices and "
                      f"{token_rows} rows of latent tokens dividing by the devices per group")
    return cfg
  if tokens >= SEQUENCE_ABOVE:
    ways = [(d, n // d) for d in range(n, 0, -1) if n % d == 0 and rows % d == 0 and token_rows % (n // d) == 0]
    return ways[0] if ways else batch
  return batch


def mesh_from_config(mesh_cfg, devices=None):
  return make_mesh(**dict(mesh_cfg), devices=devices)


def rules_from_config(overrides=None):
  """DEFAULT_RULES with entries replaced by a {logical name: mesh axis | None} mapping."""
  rules = dict(DEFAULT_RULES)
  rules.update(dict(overrides or {}))
  return tuple(rules.items())


def logical_to_spec(names, shape, mesh, rules=None):
  """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
  rules = dict(rules or DEFAULT_RULES)
  used, spec = set(), []
  for name, size in zip(names, shape):
    target = rules.get(name) if name is not None else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ()))
                 if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(state, mesh, rules=None):
  """NamedShardings for an (abstract) nnx.State whose Variables carry logical axis names."""
  def one(var):
    names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
    names = names or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def spatial_sharding(mesh, ndim=4):
  """NHWC arrays split along height over every device of the mesh (for one very large image)."""
  return NamedSharding(mesh, P(None, MESH_AXES, *(None,) * (ndim - 2)))


def batch_sharding(mesh, ndim):
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1),
                                             (mesh.shape["data"] * mesh.shape["fsdp"],) + (1,) * (ndim - 1), mesh))


# Activation constraints: models call `constrain(x, logical names)`; it is a no-op unless the
# computation is traced inside `use_mesh(...)`, so model code stays free of mesh axis names.
_ACTIVE_MESH = contextvars.ContextVar("sana_jax_active_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh, rules=None):
  """Trace (jit) model calls inside this block to keep their activations sharded as the rules say."""
  token = _ACTIVE_MESH.set((mesh, rules))
  try:
    yield mesh
  finally:
    _ACTIVE_MESH.reset(token)


def active_mesh():
  """(mesh, rules) while tracing inside use_mesh(...), else None."""
  return _ACTIVE_MESH.get()


def constrain(x, names):
  active = _ACTIVE_MESH.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def row_split(shape):
  """(mesh, PartitionSpec, ways) when the active mesh splits axis 1 of an array of `shape` (image rows,
  or row-major image tokens) ways times, as the DiT's "seq" or the DC-AE's "rows" rule says; else None."""
  active = _ACTIVE_MESH.get()
  if active is None:
    return None
  mesh, rules = active
  for name in ROW_AXES:
    spec = logical_to_spec(("batch", name) + (None,) * (len(shape) - 2), shape, mesh, rules)
    if spec[1] is not None:
      axes = (spec[1],) if isinstance(spec[1], str) else spec[1]
      return mesh, spec, math.prod(mesh.shape[a] for a in axes)
  return None


def shard_map(fn, mesh, in_specs, out_specs):
  """jax's shard_map across versions; unchecked replication (Pallas outputs and ppermute halos carry none)."""
  try:
    from jax import shard_map as mapper
    return mapper(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  except (ImportError, TypeError):  # older JAX
    from jax.experimental.shard_map import shard_map as mapper
    return mapper(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def put(tree, sharding):
  """jax.device_put of arrays the same on every process, onto a sharding that may span other processes' devices
  (sampling across the hosts of a slice): there each process supplies its own devices' pieces."""
  def one(x):
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree)


def fetch(x):
  """x itself when this process holds all of it, else every process's copy of the whole (an all-gather)."""
  if x.is_fully_addressable:
    return x
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)
