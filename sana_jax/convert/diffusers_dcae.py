"""diffusers `AutoencoderDC` checkpoints -> sana_jax.DCAE (module paths mirror diffusers')."""
from flax import nnx

from sana_jax.convert import loading
from sana_jax.convert.table import (conv1x1, conv_oihw, depthwise, glu_depthwise, glu_expand, identity, linear,
                                    split_two)
from sana_jax.models.dcae import DCAE, DCAEConfig


def _grouped_1x1(w):  # [C, hd, 1, 1] with groups of hd channels -> [C / hd, hd_in, hd_out]
  c, hd = w.shape[:2]
  return w[:, :, 0, 0].reshape(c // hd, hd, hd).transpose(0, 2, 1)


_P = r"((?:en|de)coder(?:\.[\w.]+)?)"  # the module path up to the last part
TABLE = [
    (_P + r"\.(conv1|conv2|conv_in|conv_out|conv)\.weight", r"\1.\2.kernel", conv_oihw),
    (_P + r"\.(conv1|conv_in|conv_out|conv)\.bias", r"\1.\2.bias", identity),
    (_P + r"\.(norm|norm_out)\.(weight|bias|running_mean|running_var)", r"\1.\2.\3", identity),
    (_P + r"\.(norm|norm_out)\.num_batches_tracked", None, identity),
    (_P + r"\.attn\.to_(q|k|v|out)\.weight", r"\1.attn.to_\2.kernel", linear),
    (_P + r"\.to_qkv_multiscale\.(\d+)\.proj_in\.weight", r"\1.to_qkv_multiscale.\2.proj_in", depthwise),
    (_P + r"\.to_qkv_multiscale\.(\d+)\.proj_out\.weight", r"\1.to_qkv_multiscale.\2.proj_out", _grouped_1x1),
    (_P + r"\.conv_out\.conv_inverted\.weight", r"\1.conv_out.ffn.conv_inverted.kernel", glu_expand),
    (_P + r"\.conv_out\.conv_inverted\.bias", r"\1.conv_out.ffn.conv_inverted.bias", split_two),
    (_P + r"\.conv_out\.conv_depth\.weight", r"\1.conv_out.ffn.conv_depth_kernel", glu_depthwise),
    (_P + r"\.conv_out\.conv_depth\.bias", r"\1.conv_out.ffn.conv_depth_bias", split_two),
    (_P + r"\.conv_out\.conv_point\.weight", r"\1.conv_out.ffn.conv_point.kernel", conv1x1),
]


def load(path, *, dtype, param_dtype, mesh=None, rules=None):
  path = loading.resolve_dir(path, "vae")
  cfg = DCAEConfig.from_dict(loading.read_config(path, "AutoencoderDC"))
  build = lambda: DCAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  return loading.load_weights(path, build, TABLE, mesh=mesh, rules=rules)
