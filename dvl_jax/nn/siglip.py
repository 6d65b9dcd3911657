"""The SigLIP ViT as DeepSeek-VL uses it: the low-resolution (or only) image tower.

Patch embedding (a stride-p convolution), learned absolute position embeddings, pre-norm blocks with exact
GELU, and the final LayerNorm applied; no class token and no attention-pool head.
Ref: deepseek_vl/models/siglip_vit.py VisionTransformer.forward_features; transformers SiglipVisionTransformer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvl_jax.config import SiglipConfig
from dvl_jax.nn.attention_impls import attend
from dvl_jax.nn.layers import Conv, Dtype, GeluMLP, LayerNorm, Linear, default_init, param
from dvl_jax.nn.remat import remat
from dvl_jax.sharding import constrain


class SiglipAttention(nn.Module):
  """Full (unmasked) multi-head attention with biases. Ref: transformers SiglipAttention."""

  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, P, D]
    cfg = self.config
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    n, h = cfg.num_heads, cfg.head_dim
    q = Linear((n, h), ("heads", "head_dim", "embed"), name="q_proj", **kw)(x)  # [B, P, N, H]
    k = Linear((n, h), ("heads", "head_dim", "embed"), name="k_proj", **kw)(x)
    v = Linear((n, h), ("heads", "head_dim", "embed"), name="v_proj", **kw)(x)
    out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), impl=cfg.attention)  # [B, P, N, H]
    out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
    return Linear((cfg.embed_dim,), ("embed", "heads", "head_dim"), num_in_axes=2, name="out_proj", **kw)(out)


class SiglipEncoderLayer(nn.Module):
  """x + attn(ln1(x)), then x + mlp(ln2(x)). Ref: transformers SiglipEncoderLayer; timm Block."""

  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, _=None):  # x: [B, P, D]; the signature of an nn.scan body
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + SiglipAttention(cfg, name="self_attn", **kw)(LayerNorm(cfg.norm_eps, name="layer_norm1", **kw)(x))
    x = x + GeluMLP(cfg.mlp_dim, name="mlp", **kw)(LayerNorm(cfg.norm_eps, name="layer_norm2", **kw)(x))
    return constrain(x, ("batch", "seq", "act_embed")), None


class SiglipVisionTower(nn.Module):
  """Images [B, S, S, 3] (normalised, channels-last) -> features [B, P, D], P = (S / patch)^2.

  remat_policy: rematerialisation of each block in training (dvl_jax.nn.remat); "none" for inference.
  """

  config: SiglipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p, d = cfg.patch_size, cfg.embed_dim
    x = Conv(d, p, stride=p, name="patch_embedding", **kw)(pixels)  # [B, S/p, S/p, D]
    x = x.reshape(x.shape[0], -1, d)  # [B, P, D], patches row-major
    pos = param(self, "position_embedding", default_init, (cfg.num_patches, d), ("patches", "embed"),
                self.param_dtype)
    x = constrain(x + pos.astype(self.dtype), ("batch", "seq", "act_embed"))
    # Remat inside the scan, one block per step; no CSE barriers needed in a scan body (jax.checkpoint docs).
    block = remat(SiglipEncoderLayer, self.remat_policy, prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, name="layers", **kw)(x, None)
    return LayerNorm(cfg.norm_eps, name="post_layernorm", **kw)(x)
