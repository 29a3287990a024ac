"""DC-AE, the deep-compression autoencoder (diffusers' AutoencoderDC), in Flax NNX, NHWC.

`encode(images in [-1, 1]) -> latents` (unscaled, as diffusers returns them) and
`decode(latents) -> images`; multiply by `scaling_factor` before the DiT, divide after.
Channel orders inside (pixel (un)shuffle, shortcut grouping, the multi-scale q/k/v split) follow
the PyTorch reference exactly, so its weights load by a name table alone.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sana_jax import fields as F
from sana_jax import parallel
from sana_jax.errors import SanaError, short
from sana_jax.kernels import linear_attention
from sana_jax.models import layers as L

_ROWS = ("batch", "rows", None, None)  # NHWC activations: under parallel.DECODE_RULES, rows split over the devices
ACTIVATIONS = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "silu": jax.nn.silu, "swish": jax.nn.silu,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
  """Field names follow diffusers' AutoencoderDC config.json; per-stage fields accept one value."""
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: str | tuple = "ResBlock"
  decoder_block_types: str | tuple = "ResBlock"
  encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: str | tuple = "rms_norm"
  decoder_act_fns: str | tuple = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0

  @property
  def spatial_compression(self):
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  def per_stage(self, name):
    value, n = getattr(self, name), len(self.encoder_block_out_channels if name.startswith("encoder")
                                         else self.decoder_block_out_channels)
    return (value,) * n if isinstance(value, str) else tuple(value)

  @classmethod
  def from_dict(cls, d, source="autoencoder config"):
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise SanaError(f"{source}: unknown autoencoder config key(s) {short(unknown)}")
    return cls(**d).validated(source)

  def validated(self, source="autoencoder config"):
    """This config with every field type- and range-checked (lists as tuples); per-stage fields must
    have one entry per stage."""
    self = dataclasses.replace(self, **F.validate(dataclasses.asdict(self), _CHECKS, source))
    for side in ("encoder", "decoder"):
      stages = len(getattr(self, f"{side}_block_out_channels"))
      for name in [f"{side}_layers_per_block", f"{side}_qkv_multiscales", f"{side}_block_types"] + (
          ["decoder_norm_types", "decoder_act_fns"] if side == "decoder" else []):
        if len(self.per_stage(name)) != stages:
          raise SanaError(f"{source}: {name} has {len(self.per_stage(name))} entries for {stages} stages")
      for i, (kind, width) in enumerate(zip(self.per_stage(f"{side}_block_types"),
                                            getattr(self, f"{side}_block_out_channels"))):
        if kind == "EfficientViTBlock" and width % self.attention_head_dim:
          raise SanaError(f"{source}: {side} stage {i} width {width} is not a multiple of attention_head_dim "
                          f"{self.attention_head_dim}")
    return self


def _names(options):
  one = F.choice(*options)
  return F.either(one, F.sequence(one, min_len=1, max_len=16))


_STAGES = dict(min_len=1, max_len=10)  # 2^9 = 512x compression at most
_CHECKS = {
    "in_channels": F.integer(1, 64), "latent_channels": F.integer(1, 1024), "attention_head_dim": F.integer(1, 1024),
    "encoder_block_types": _names(BLOCK_TYPES), "decoder_block_types": _names(BLOCK_TYPES),
    "encoder_block_out_channels": F.sequence(F.integer(1, 1 << 14), **_STAGES),
    "decoder_block_out_channels": F.sequence(F.integer(1, 1 << 14), **_STAGES),
    "encoder_layers_per_block": F.sequence(F.integer(0, 64), **_STAGES),
    "decoder_layers_per_block": F.sequence(F.integer(0, 64), **_STAGES),
    "encoder_qkv_multiscales": F.sequence(F.sequence(F.integer(1, 15), max_len=8), **_STAGES),
    "decoder_qkv_multiscales": F.sequence(F.sequence(F.integer(1, 15), max_len=8), **_STAGES),
    "upsample_block_type": F.choice("pixel_shuffle", "interpolate"),
    "downsample_block_type": F.text(64),  # diffusers: anything but pixel_unshuffle is a strided conv
    "decoder_norm_types": _names(NORM_TYPES), "decoder_act_fns": _names(tuple(ACTIVATIONS)),
    "encoder_out_shortcut": F.boolean, "decoder_in_shortcut": F.boolean,
    "decoder_conv_act_fn": F.choice(*ACTIVATIONS), "scaling_factor": F.real(hi=1e6, above=0),
}


# ---------------------------------------------------------------------------------------------
# channel rearrangements, NHWC, in PyTorch's channel order


def pixel_unshuffle(x, f=2):
  """[B, H, W, C] -> [B, H/f, W/f, C*f*f]; channel c*f*f + i*f + j holds pixel (f*h + i, f*w + j)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // f, w // f, c * f * f)


def pixel_shuffle(x, f=2):
  """Inverse of pixel_unshuffle: [B, H, W, C*f*f] -> [B, H*f, W*f, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h, w, c // (f * f), f, f).transpose(0, 1, 4, 2, 5, 3).reshape(b, h * f, w * f, c // (f * f))


def group_mean(x, out_channels):
  """Mean over runs of consecutive channels: [..., C] -> [..., out_channels]."""
  return x.reshape(*x.shape[:-1], out_channels, -1).mean(axis=-1)


def repeat_channels(x, repeats):
  """Each channel repeated `repeats` times in place (torch.repeat_interleave on dim 1)."""
  return jnp.repeat(x, repeats, axis=-1)


# ---------------------------------------------------------------------------------------------
# layers


class Conv(nnx.Module):
  """k x k convolution, NHWC, PyTorch-style symmetric padding k // 2."""

  def __init__(self, cin, cout, k=3, *, stride=1, use_bias=True, rngs, dtype, param_dtype):
    self.kernel = L.param(rngs, L.xavier, (k, k, cin, cout), (None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = L.param(rngs, L.zeros, (cout,), ("conv_out",), param_dtype) if use_bias else None
    self.stride, self.pad, self.dtype = stride, k // 2, dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        [(self.pad, self.pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
  """Inference-mode batch norm with stored statistics (eps 1e-5, as torch's BatchNorm2d)."""

  def __init__(self, c, *, rngs, dtype, param_dtype):
    self.weight = L.param(rngs, L.ones, (c,), ("conv_out",), param_dtype)
    self.bias = L.param(rngs, L.zeros, (c,), ("conv_out",), param_dtype)
    self.running_mean = nnx.BatchStat(jnp.zeros((c,), param_dtype))
    self.running_var = nnx.BatchStat(jnp.ones((c,), param_dtype))
    self.dtype = dtype

  def __call__(self, x):
    f32 = lambda v: v[...].astype(jnp.float32)
    scale = f32(self.weight) * jax.lax.rsqrt(f32(self.running_var) + 1e-5)
    return ((x.astype(jnp.float32) - f32(self.running_mean)) * scale + f32(self.bias)).astype(self.dtype)


def make_norm(norm_type, c, **kw):
  if norm_type == "rms_norm":
    return L.RMSNorm(c, "conv_out", eps=1e-5, affine=True, bias=True, **kw)
  return BatchNorm(c, **kw)


class ResBlock(nnx.Module):
  """x + norm(conv3x3(act(conv3x3(x))))."""

  def __init__(self, c, norm_type, act, **kw):
    self.conv1 = Conv(c, c, **kw)
    self.conv2 = Conv(c, c, use_bias=False, **kw)
    self.norm = make_norm(norm_type, c, **kw)
    self.act = act

  def __call__(self, x):
    return x + self.norm(self.conv2(ACTIVATIONS[self.act](self.conv1(x))))


class MultiscaleProjection(nnx.Module):
  """Depthwise k x k then a grouped 1x1 (one head_dim x head_dim matrix per group of channels)."""

  def __init__(self, channels, head_dim, k, *, rngs, dtype, param_dtype):
    self.proj_in = L.param(rngs, nnx.initializers.normal(0.2), (k, k, channels), (None, None, "conv_out"),
                           param_dtype)
    self.proj_out = L.param(rngs, L.xavier, (channels // head_dim, head_dim, head_dim), ("conv_out", None, None),
                            param_dtype)
    self.dtype = dtype

  def __call__(self, x):
    x = L.depthwise_conv(x, self.proj_in[...])
    g, d, _ = self.proj_out.shape
    x = x.reshape(*x.shape[:-1], g, d)
    out = jnp.einsum("...gi,gio->...go", x, self.proj_out[...].astype(self.dtype))
    return out.reshape(*out.shape[:-2], g * d)


class MultiscaleLinearAttention(nnx.Module):
  """EfficientViT's multi-scale ReLU linear attention with a residual connection."""

  def __init__(self, c, head_dim, scales, norm_type, **kw):
    inner = (c // head_dim) * head_dim
    dense = lambda din, dout: L.Dense(din, dout, ("conv_out", "conv_out2"), use_bias=False, **kw)
    self.to_q, self.to_k, self.to_v = dense(c, inner), dense(c, inner), dense(c, inner)
    self.to_qkv_multiscale = nnx.List([MultiscaleProjection(3 * inner, head_dim, k, **kw) for k in scales])
    self.to_out = dense(inner * (1 + len(scales)), c)
    self.norm_out = make_norm(norm_type, c, **kw)
    self.head_dim, self.dtype = head_dim, kw["dtype"]

  def __call__(self, x):
    b, h, w, _ = x.shape
    qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
    qkv = jnp.concatenate([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], axis=-1)
    # The reference splits every run of 3 * head_dim consecutive channels into (q, k, v) "heads";
    # runs cross the q/k/v boundaries of the concatenation, and the weights were trained that way.
    qkv = qkv.reshape(b, h * w, -1, 3, self.head_dim)
    q, k, v = jax.nn.relu(qkv[..., 0, :]), jax.nn.relu(qkv[..., 1, :]), qkv[..., 2, :]
    out = linear_attention(q, k, v, eps=1e-15).astype(self.dtype).reshape(b, h, w, -1)
    return x + self.norm_out(self.to_out(out))


class GLUMBConv(nnx.Module):
  """x + RMSNorm(MixFFN(x)): the EfficientViT block's feed-forward (expansion 4)."""

  def __init__(self, c, **kw):
    self.ffn = L.MixFFN(c, 4 * c, **kw)
    self.norm = L.RMSNorm(c, "conv_out", eps=1e-5, affine=True, bias=True, **kw)

  def __call__(self, x):
    return x + self.norm(self.ffn(x))


class EfficientViTBlock(nnx.Module):
  def __init__(self, c, head_dim, scales, norm_type, **kw):
    self.attn = MultiscaleLinearAttention(c, head_dim, scales, norm_type, **kw)
    self.conv_out = GLUMBConv(c, **kw)

  def __call__(self, x):
    return self.conv_out(self.attn(x))


def make_block(block_type, c, head_dim, scales, norm_type, act, **kw):
  if block_type == "ResBlock":
    return ResBlock(c, norm_type, act, **kw)
  return EfficientViTBlock(c, head_dim, scales, norm_type, **kw)


class DownBlock(nnx.Module):
  """Halve H and W: 3x3 conv (stride 2, or stride 1 + pixel_unshuffle) plus a space-to-channel
  shortcut averaged down to the output channels."""

  def __init__(self, cin, cout, unshuffle, shortcut, **kw):
    self.conv = Conv(cin, cout // 4 if unshuffle else cout, stride=1 if unshuffle else 2, **kw)
    self.unshuffle, self.shortcut, self.cout = unshuffle, shortcut, cout

  def __call__(self, x):
    y = self.conv(x)
    if self.unshuffle:
      y = pixel_unshuffle(y)
    return y + group_mean(pixel_unshuffle(x), self.cout) if self.shortcut else y


class UpBlock(nnx.Module):
  """Double H and W: nearest upsampling + 3x3 conv, or 3x3 conv + pixel_shuffle, plus a
  channel-to-space shortcut of repeated channels."""

  def __init__(self, cin, cout, interpolate, shortcut, **kw):
    self.conv = Conv(cin, cout if interpolate else cout * 4, **kw)
    self.interpolate, self.shortcut, self.repeats = interpolate, shortcut, cout * 4 // cin

  def __call__(self, x):
    if self.interpolate:
      y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    else:
      y = pixel_shuffle(self.conv(x))
    return y + pixel_shuffle(repeat_channels(x, self.repeats)) if self.shortcut else y


class Encoder(nnx.Module):
  def __init__(self, cfg: DCAEConfig, **kw):
    chans, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
    types, scales = cfg.per_stage("encoder_block_types"), cfg.encoder_qkv_multiscales
    unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
    first = chans[0] if layers[0] > 0 else chans[1]
    self.conv_in = (Conv(cfg.in_channels, first, **kw) if layers[0] > 0
                    else DownBlock(cfg.in_channels, first, unshuffle, shortcut=False, **kw))
    stages = []
    for i, (c, n) in enumerate(zip(chans, layers)):
      stage = [make_block(types[i], c, cfg.attention_head_dim, scales[i], "rms_norm", "silu", **kw) for _ in range(n)]
      if i < len(chans) - 1 and n > 0:
        stage.append(DownBlock(c, chans[i + 1], unshuffle, shortcut=True, **kw))
      stages.append(nnx.List(stage))
    self.down_blocks = nnx.List(stages)
    self.conv_out = Conv(chans[-1], cfg.latent_channels, **kw)
    self.out_shortcut, self.latent_channels = cfg.encoder_out_shortcut, cfg.latent_channels

  def __call__(self, x):
    x = self.conv_in(x)
    for stage in self.down_blocks:
      for block in stage:
        x = block(x)
    y = self.conv_out(x)
    return y + group_mean(x, self.latent_channels) if self.out_shortcut else y


class Decoder(nnx.Module):
  def __init__(self, cfg: DCAEConfig, **kw):
    chans, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
    types, scales = cfg.per_stage("decoder_block_types"), cfg.decoder_qkv_multiscales
    norms, acts = cfg.per_stage("decoder_norm_types"), cfg.per_stage("decoder_act_fns")
    interpolate = cfg.upsample_block_type == "interpolate"
    self.conv_in = Conv(cfg.latent_channels, chans[-1], **kw)
    self.in_shortcut, self.in_repeats = cfg.decoder_in_shortcut, chans[-1] // cfg.latent_channels
    stages = []  # stages[i] is stage i; they run from the last (smallest) to the first
    for i, (c, n) in enumerate(zip(chans, layers)):
      stage = []
      if i < len(chans) - 1 and n > 0:
        stage.append(UpBlock(chans[i + 1], c, interpolate, shortcut=True, **kw))
      stage += [make_block(types[i], c, cfg.attention_head_dim, scales[i], norms[i], acts[i], **kw) for _ in range(n)]
      stages.append(nnx.List(stage))
    self.up_blocks = nnx.List(stages)
    last = chans[0] if layers[0] > 0 else chans[1]
    self.norm_out = L.RMSNorm(last, "conv_out", eps=1e-5, affine=True, bias=True, **kw)
    self.conv_act = cfg.decoder_conv_act_fn
    self.conv_out = (Conv(last, cfg.in_channels, **kw) if layers[0] > 0
                     else UpBlock(last, cfg.in_channels, interpolate, shortcut=False, **kw))

  def __call__(self, z):
    x = self.conv_in(z)
    if self.in_shortcut:
      x = x + repeat_channels(z.astype(x.dtype), self.in_repeats)
    # every block's output pinned to the row split: the partitioner would otherwise gather whole images
    # around the attention's reshapes and the upsampling
    x = parallel.constrain(x, _ROWS)
    for stage in reversed(self.up_blocks):
      for block in stage:
        x = parallel.constrain(block(x), _ROWS)
    return parallel.constrain(self.conv_out(ACTIVATIONS[self.conv_act](self.norm_out(x))), _ROWS)


class DCAE(nnx.Module):
  """encode(images [B, H, W, 3] in [-1, 1]) -> latents [B, H/f, W/f, C]; decode(latents) -> images."""

  def __init__(self, config: DCAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config.validated()
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(self.config, **kw)
    self.decoder = Decoder(self.config, **kw)
    self.dtype = dtype

  @property
  def scaling_factor(self):
    return self.config.scaling_factor

  def _check(self, x, factor, what):
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise SanaError(f"{what} of shape {tuple(x.shape)}: expected [B, H, W, C] with H and W multiples of {factor}")

  def encode(self, images):
    self._check(images, self.config.spatial_compression, "images")
    return self.encoder(images.astype(self.dtype))

  def decode(self, latents):
    self._check(latents, 1, "latents")
    return self.decoder(latents.astype(self.dtype))

  def tiled_decode(self, latents, tile=1024, stride=896):
    """decode() in overlapping tiles of `tile` pixels every `stride` pixels, blended linearly over the
    overlap, so memory is bounded by one tile. Equal to decode() when the image fits in one tile."""
    f = self.config.spatial_compression
    _check_tiling(tile, stride, f)
    return _tiled(self._pure("decode"), latents, tile // f, stride // f, scale=f)

  def tiled_encode(self, images, tile=1024, stride=896):
    """encode() in overlapping pixel tiles, blended in latent space; exact when one tile covers all."""
    self._check(images, self.config.spatial_compression, "images")
    f = self.config.spatial_compression
    _check_tiling(tile, stride, f)
    return _tiled(self._pure("encode"), images, tile, stride, scale=1 / f)

  def sharded_decode(self, latents, mesh):
    """decode() of one large image split along height across all devices of `mesh`.

    Weights are replicated; the partitioner exchanges convolution halos between neighbouring
    shards and all-reduces the linear-attention sums. Latent height must divide by the device count.
    """
    n = mesh.devices.size
    if latents.shape[1] % n:
      raise SanaError(f"latent height {latents.shape[1]} is not divisible by the {n} devices of the mesh")
    graphdef, state = nnx.split(self)
    state = parallel.put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return _decode_split(graphdef, mesh, state, parallel.put(latents, parallel.spatial_sharding(mesh)))

  def _pure(self, method):
    """A jitted function of the input alone, over the weights as they are now. One shared jit keyed
    by the (static) graph and method, so repeated calls, tiled ones too, reuse compiled programs."""
    graphdef, state = nnx.split(self)
    return lambda x: _apply_method(graphdef, method, state, x)

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, *, param_dtype=None, mesh=None, rules=None):
    """Loads a diffusers `AutoencoderDC` directory (config.json + safetensors), or a pipeline's vae/."""
    from sana_jax.convert import diffusers_dcae
    return diffusers_dcae.load(path, dtype=dtype, param_dtype=param_dtype or dtype, mesh=mesh, rules=rules)

  def save_pretrained(self, directory, dtype="float32", **kwargs):
    """Writes a diffusers `AutoencoderDC` directory (config.json + safetensors in `dtype`)."""
    from sana_jax.convert import writing
    writing.save_pretrained(self, directory, dtype, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_method(graphdef, method, state, x):
  return getattr(nnx.merge(graphdef, state), method)(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_split(graphdef, mesh, state, z):
  """decode() with its activations' rows split over every device of `mesh` (DCAE.sharded_decode)."""
  with parallel.use_mesh(mesh, parallel.DECODE_RULES):
    return nnx.merge(graphdef, state).decode(z)


def _check_tiling(tile, stride, factor):
  if tile % factor or stride % factor or not 0 < stride <= tile:
    raise SanaError(f"tiling needs 0 < stride <= tile, both multiples of {factor} pixels; "
                    f"got tile={tile}, stride={stride}")


def _tiled(fn, x, tile, stride, scale):
  """Applies `fn` to overlapping [tile x tile] windows of x every `stride` (input units); output units
  are input units * scale. Each tile's top and left overlap is blended linearly with its neighbour's,
  then tiles are cropped to the stride and concatenated (the scheme diffusers uses)."""
  b, h, w, _ = x.shape
  if h <= tile and w <= tile:
    return fn(x)
  out = lambda n: int(round(n * scale))
  blend, keep = out(tile - stride), out(stride)
  tiles = [[fn(x[:, i:i + tile, j:j + tile]) for j in range(0, w, stride)] for i in range(0, h, stride)]
  rows = []
  for r, row in enumerate(tiles):
    pieces = []
    for c, t in enumerate(row):
      if r > 0:
        t = _blend(tiles[r - 1][c], t, blend, axis=1)
      if c > 0:
        t = _blend(row[c - 1], t, blend, axis=2)
      row[c] = t  # neighbours blend with the already-blended tile, as diffusers' in-place update does
      pieces.append(t[:, :keep, :keep])
    rows.append(jnp.concatenate(pieces, axis=2))
  return jnp.concatenate(rows, axis=1)[:, :out(h), :out(w)]


def _blend(prev, cur, extent, axis):
  """Fades from the end of `prev` into the start of `cur` over `extent` rows (axis=1) or columns."""
  extent = min(extent, prev.shape[axis], cur.shape[axis])
  if extent <= 0:
    return cur
  shape = [1] * cur.ndim
  shape[axis] = extent
  weight = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
  take = lambda a, start, n: jax.lax.slice_in_dim(a, start, start + n, axis=axis).astype(jnp.float32)
  mixed = take(prev, prev.shape[axis] - extent, extent) * (1 - weight) + take(cur, 0, extent) * weight
  rest = jax.lax.slice_in_dim(cur, extent, cur.shape[axis], axis=axis)
  return jnp.concatenate([mixed.astype(cur.dtype), rest], axis=axis)
