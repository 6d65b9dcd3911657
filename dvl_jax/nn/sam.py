"""The SAM-B ViTDet image encoder and DeepSeek-VL's high-resolution branch built on it (the 7B hybrid model).

Trunk: patch embedding, absolute position embedding, pre-norm blocks with decomposed relative positions,
windowed (zero-padded, unmasked) attention except in the global blocks, and a neck (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d). The high-res branch runs the neck on the last block and a second neck (`neck_hd`) on
the first global block, resizes both to 4x the SigLIP grid (bilinear, half-pixel), passes both through the
same two stride-2 convs, and adds them: `last + alpha * global`.

The blocks are not scanned: window and global blocks differ in their relative-position tables and the branch
reads one block's output, and twelve blocks compile quickly.
Ref: deepseek_vl/models/sam.py ImageEncoderViT; transformers SamVisionEncoder and
DeepseekVLHybridModel.get_high_res_image_features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvl_jax.config import SamConfig
from dvl_jax.nn.attention_impls import attend
from dvl_jax.nn.layers import Conv, Dtype, GeluMLP, LayerNorm, Linear, default_init, param
from dvl_jax.nn.remat import remat
from dvl_jax.sharding import constrain


def resize_linear_1d(table: jax.Array, size: int) -> jax.Array:
  """Resizes [L, C] to [size, C] like F.interpolate(mode="linear", align_corners=False): half-pixel source
  coordinates clamped at 0, no antialiasing (jax.image.resize antialiases when shrinking)."""
  length = table.shape[0]
  if length == size:
    return table
  src = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * (length / size) - 0.5, 0.0)
  lo = jnp.floor(src).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, length - 1)
  w = (src - lo)[:, None]
  t = table.astype(jnp.float32)
  return ((1 - w) * t[lo] + w * t[hi]).astype(table.dtype)


def rel_pos_table(size: int, table: jax.Array) -> jax.Array:
  """Relative-position embeddings for every (query, key) pair along one axis of `size` tokens.

  Ref: transformers SamVisionAttention.get_rel_pos with q_size == k_size; the table is interpolated to
  2 * size - 1 rows when its length differs.
  Returns: [size(q), size(k), H].
  """
  table = resize_linear_1d(table, 2 * size - 1)
  coords = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
  return table[coords]


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C], bilinear with half-pixel centres (F.interpolate(align_corners=False)),
  computed in float32 as the original does. For upsampling, jax.image.resize matches PyTorch at the borders
  too (tested)."""
  b, _, _, c = x.shape
  return jax.image.resize(x.astype(jnp.float32), (b, size, size, c), method="bilinear").astype(x.dtype)


class SamAttention(nn.Module):
  """Multi-head attention over a [B, h, w, D] map with decomposed relative positions.

  logits = (q * scale) k^T + rel_h + rel_w, where rel_h[i, j] = q_i . R_h[row(i) - row(j)] (unscaled q): the
  relative positions are an additive bias that depends on q (its gradient reaches q through it too).
  """

  config: SamConfig
  size: int  # tokens per side of the map it attends over: the window, or the whole grid
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, h, w, D]
    cfg = self.config
    b, h, w, d = x.shape
    n, hd = cfg.num_heads, cfg.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Fused projection, rows [q; k; v], each head-major. Ref: sam.py Attention.forward reshape (B, HW, 3, N, H).
    qkv = Linear((3, n, hd), (None, "heads", "head_dim", "embed"), use_bias=True, name="qkv", **kw)(x)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, h, w, N, H]
    rel_h = rel_pos_table(h, param(self, "rel_pos_h", nn.initializers.zeros, (2 * self.size - 1, hd),
                                   (None, "head_dim"), self.param_dtype).astype(self.dtype))  # [h, h, H]
    rel_w = rel_pos_table(w, param(self, "rel_pos_w", nn.initializers.zeros, (2 * self.size - 1, hd),
                                   (None, "head_dim"), self.param_dtype).astype(self.dtype))  # [w, w, H]
    bias_h = jnp.einsum("BhwNH,hkH->BNhwk", q, rel_h, preferred_element_type=jnp.float32)  # [B, N, h, w, h]
    bias_w = jnp.einsum("BhwNH,wvH->BNhwv", q, rel_w, preferred_element_type=jnp.float32)  # [B, N, h, w, w]
    bias = (bias_h[..., None] + bias_w[..., None, :]).reshape(b, n, h * w, h * w)  # [B, N, T, S], T = S = hw
    q, k, v = (x.reshape(b, h * w, n, hd) for x in (q, k, v))  # [B, T, N, H]
    out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), impl=cfg.attention, bias=bias)
    out = out.reshape(b, h, w, n, hd)
    return Linear((d,), ("embed", "heads", "head_dim"), num_in_axes=2, use_bias=True, name="proj", **kw)(out)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, C] -> [B * nh * nw, window, window, C], zero-padding H and W up to multiples of the window."""
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  nh, nw = (h + ph) // window, (w + pw) // window
  x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
  """The inverse of window_partition, cropping the padding: -> [B, h, w, C]."""
  nh, nw = -(-h // window), -(-w // window)
  b = windows.shape[0] // (nh * nw)
  x = windows.reshape(b, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * window, nw * window, -1)[:, :h, :w]


class SamBlock(nn.Module):
  """x + attn(norm1(x)) (windowed unless global), then x + mlp(norm2(x)). Ref: sam.py Block.forward."""

  config: SamConfig
  is_global: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, G, G, D]
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, g, _, _ = x.shape
    h = LayerNorm(cfg.norm_eps, name="layer_norm1", **kw)(x)
    if self.is_global:
      h = SamAttention(cfg, g, name="attn", **kw)(h)
    else:  # padded after the norm, padded tokens unmasked, as the reference
      windows = window_partition(h, cfg.window_size)
      h = window_unpartition(SamAttention(cfg, cfg.window_size, name="attn", **kw)(windows), cfg.window_size, g, g)
    x = x + h
    x = x + GeluMLP(cfg.mlp_dim, ("lin1", "lin2"), name="mlp", **kw)(LayerNorm(cfg.norm_eps, name="layer_norm2",
                                                                               **kw)(x))
    return constrain(x, ("batch", None, None, "act_embed"))


class SamNeck(nn.Module):
  """1x1 conv, LayerNorm2d, 3x3 conv (pad 1), LayerNorm2d; no biases on the convs. [B, G, G, D] -> [B, G, G, C]."""

  neck_dim: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Conv(self.neck_dim, 1, use_bias=False, name="conv1", **kw)(x)
    x = LayerNorm(self.eps, name="layer_norm1", **kw)(x)  # LayerNorm2d: over channels, channels-last here
    x = Conv(self.neck_dim, 3, padding=1, use_bias=False, name="conv2", **kw)(x)
    return LayerNorm(self.eps, name="layer_norm2", **kw)(x)


class SamEncoder(nn.Module):
  """The SAM ViT trunk with its neck. Returns (neck(last block) [B, G, G, C], first global block [B, G, G, D]).

  remat_policy: rematerialisation of each block in training (dvl_jax.nn.remat); "none" for inference.
  """

  config: SamConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:  # pixels: [B, S, S, 3]
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Conv(cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size, name="patch_embed", **kw)(pixels)  # [B, G, G, D]
    pos = param(self, "pos_embed", default_init, (1, cfg.grid_size, cfg.grid_size, cfg.embed_dim),
                (None, None, None, "embed"), self.param_dtype)
    x = x + pos.astype(self.dtype)
    first_global = None
    block = remat(SamBlock, self.remat_policy)
    for i in range(cfg.num_layers):
      x = block(cfg, i in cfg.global_attn_indexes, name=f"layers_{i}", **kw)(x)
      if i == cfg.global_attn_indexes[0]:
        first_global = x
    return SamNeck(cfg.neck_dim, cfg.norm_eps, name="neck", **kw)(x), first_global


class SamHighResTower(nn.Module):
  """High-resolution images [B, S, S, 3] -> features [B, g * g, 4 * neck_dim], row-major, g = out_grid."""

  config: SamConfig
  out_grid: int  # the SigLIP grid side: features are resized to 4x it, then halved twice
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"  # of each SAM block, see SamEncoder

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    last, first_global = SamEncoder(cfg, name="vision_encoder", remat_policy=self.remat_policy, **kw)(pixels)
    hd = SamNeck(cfg.neck_dim, cfg.norm_eps, name="neck_hd", **kw)(first_global)
    # One set of downsample convs serves both paths. Ref: sam.py ImageEncoderViT.forward (sam_hd branch).
    down1 = Conv(2 * cfg.neck_dim, 3, stride=2, padding=1, use_bias=False, name="downsample1", **kw)
    down2 = Conv(4 * cfg.neck_dim, 3, stride=2, padding=1, use_bias=False, name="downsample2", **kw)
    size = 4 * self.out_grid
    y = down2(down1(resize_bilinear(last, size)))  # [B, g, g, 4C]
    y_hd = down2(down1(resize_bilinear(hd, size)))
    alpha = param(self, "alpha", nn.initializers.zeros, (1,), (None,), self.param_dtype).astype(self.dtype)
    y = y + y_hd * alpha
    return constrain(y.reshape(y.shape[0], -1, y.shape[-1]), ("batch", "seq", "act_embed"))
