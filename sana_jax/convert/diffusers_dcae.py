"""diffusers `AutoencoderDC` checkpoints <-> sana_jax.DCAE (module paths mirror diffusers')."""
import dataclasses

import numpy as np
from flax import nnx

from sana_jax import dtypes
from sana_jax.convert import invert, loading
from sana_jax.convert.table import (
  CONV1X1,
  CONV_OIHW,
  DEPTHWISE,
  GLU_DEPTHWISE,
  GLU_EXPAND,
  IDENTITY,
  LINEAR,
  SPLIT_TWO,
  Transform,
)
from sana_jax.models.dcae import DCAE, DCAEConfig

# [C, hd, 1, 1] with groups of hd channels <-> [C / hd, hd_in, hd_out]
GROUPED_1X1 = Transform(
    "grouped_1x1", lambda w: w[:, :, 0, 0].reshape(w.shape[0] // w.shape[1], w.shape[1], w.shape[1]).transpose(0, 2, 1),
    lambda w, cfg: w.transpose(0, 2, 1).reshape(-1, w.shape[1])[:, :, None, None])
# torch's BatchNorm2d step counter: the loader drops it, the exporter writes a zero
STEP_COUNTER = Transform("step_counter", None, lambda w, cfg: np.zeros((), np.int64))

_P = r"((?:en|de)coder(?:\.[\w.]+)?)"  # the module path up to the last part
TABLE = [
    (_P + r"\.(conv1|conv2|conv_in|conv_out|conv)\.weight", r"\1.\2.kernel", CONV_OIHW),
    (_P + r"\.(conv1|conv_in|conv_out|conv)\.bias", r"\1.\2.bias", IDENTITY),
    (_P + r"\.(norm|norm_out)\.(weight|bias|running_mean|running_var)", r"\1.\2.\3", IDENTITY),
    (_P + r"\.(norm|norm_out)\.num_batches_tracked", None, STEP_COUNTER),
    (_P + r"\.attn\.to_(q|k|v|out)\.weight", r"\1.attn.to_\2.kernel", LINEAR),
    (_P + r"\.to_qkv_multiscale\.(\d+)\.proj_in\.weight", r"\1.to_qkv_multiscale.\2.proj_in", DEPTHWISE),
    (_P + r"\.to_qkv_multiscale\.(\d+)\.proj_out\.weight", r"\1.to_qkv_multiscale.\2.proj_out", GROUPED_1X1),
    (_P + r"\.conv_out\.conv_inverted\.weight", r"\1.conv_out.ffn.conv_inverted.kernel", GLU_EXPAND),
    (_P + r"\.conv_out\.conv_inverted\.bias", r"\1.conv_out.ffn.conv_inverted.bias", SPLIT_TWO),
    (_P + r"\.conv_out\.conv_depth\.weight", r"\1.conv_out.ffn.conv_depth_kernel", GLU_DEPTHWISE),
    (_P + r"\.conv_out\.conv_depth\.bias", r"\1.conv_out.ffn.conv_depth_bias", SPLIT_TWO),
    (_P + r"\.conv_out\.conv_point\.weight", r"\1.conv_out.ffn.conv_point.kernel", CONV1X1),
]
CLASS_NAME = "AutoencoderDC"


def read_config(path):
  """The DCAEConfig of a diffusers autoencoder directory (or a pipeline's vae/)."""
  path = loading.resolve_dir(path, "vae")
  return path, DCAEConfig.from_dict(loading.read_config(path, CLASS_NAME), source=f"{path}/config.json")


def load(path, *, dtype, param_dtype, mesh=None, rules=None):
  dtype, param_dtype = dtypes.resolve(dtype), dtypes.resolve(param_dtype)
  path, cfg = read_config(path)
  build = lambda: DCAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  return loading.load_weights(path, build, TABLE, mesh=mesh, rules=rules)


def component(model):
  """The export plan: diffusers' names for every weight (BatchNorm step counters included), and config.json."""
  state = invert.flat_state(model)
  entries = invert.plan(state, TABLE, source="vae")
  entries += [invert.Entry(e.name.replace(".running_mean", ".num_batches_tracked"), None, None, STEP_COUNTER, ())
              for e in entries if e.name.endswith(".running_mean")]
  invert.check_names(entries, TABLE, source="vae")
  return invert.Component(dataclasses.asdict(model.config), model.config, entries, state, "diffusion_pytorch_model",
                          "diffusers", CLASS_NAME)
