"""The projector from vision features to the decoder's embedding space.

Ref: deepseek_vl/models/projector.py MlpProjector ("mlp_gelu"); transformers DeepseekVLAligner.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvl_jax.config import AlignerConfig
from dvl_jax.nn.layers import Dtype, Linear, gelu
from dvl_jax.sharding import constrain


class MlpAligner(nn.Module):
  """linear1 -> (GELU -> linear{i}) for i in 2..depth. [B, P, in_dim] -> [B, P, out_dim].

  The hidden width is out_dim, so the hidden axis is named "mlp" and the output axis "embed".
  """

  config: AlignerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(1, cfg.depth + 1):
      if i > 1:
        x = gelu(x)
      out_axis, in_axis = ("embed" if i == cfg.depth else "mlp"), ("embed" if i == 1 else "mlp")
      axes = (out_axis, in_axis if in_axis != out_axis else None)  # one logical name per kernel
      x = Linear((cfg.out_dim,), axes, name=f"linear{i}", **kw)(x)
    return constrain(x, ("batch", "seq", "act_embed"))


class HybridAligner(nn.Module):
  """The 7B's split projector: high-res and low-res features are projected to half the width each,
  concatenated high first, then GELU and a projection. [B, P, *] x 2 -> [B, P, out_dim].

  Ref: projector.py MlpProjector ("low_high_hybrid_split_mlp_gelu"); transformers DeepseekVLHybridAligner.
  """

  config: AlignerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    half = (cfg.out_dim // 2,)
    high = Linear(half, ("mlp", "embed"), name="high_res_vision_proj", **kw)(high)
    low = Linear(half, ("mlp", "embed"), name="vision_proj", **kw)(low)
    x = gelu(jnp.concatenate([high, low], axis=-1))  # [B, P, out_dim]
    x = Linear((cfg.out_dim,), ("embed", "mlp"), name="proj", **kw)(x)
    return constrain(x, ("batch", "seq", "act_embed"))
