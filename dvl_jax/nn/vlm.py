"""DeepseekVL: encode the images, splice them into the token embeddings, run the decoder.

Ref: deepseek_vl/models/modeling_vlm.py MultiModalityCausalLM.prepare_inputs_embeds;
transformers DeepseekVLModel.forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvl_jax import sharding
from dvl_jax.config import ModelConfig
from dvl_jax.nn.aligner import HybridAligner, MlpAligner
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.nn.llama import LlamaDecoder
from dvl_jax.nn.output import Output
from dvl_jax.nn.sam import SamHighResTower
from dvl_jax.nn.siglip import SiglipVisionTower


def splice_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
  """Replaces, row by row and in order, the embeddings at image-token positions by the image features.

  The k-th image token of row b takes features[b, k]: each row's images stay with that row, so a batch
  splits over data-parallel devices. Callers check the counts (`Model` does, on the host); here, extra
  feature slots are ignored.

  Args:
    embeds: [B, T, D] token embeddings.
    is_image: bool [B, T].
    features: [B, M, D], M = images per row * tokens per image.
  Returns:
    [B, T, D].
  """
  idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)  # [B, T]
  gathered = jnp.take_along_axis(features, idx[..., None], axis=1)  # [B, T, D]
  return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class DeepseekVL(nn.Module):
  """The whole model, functional: `params = init(...)`, `out = apply(params, ...)` (an Output: `out.logits`,
  `out.cache`).

  padded_vocab_size: the decoder's vocabulary rows on a mesh that needs padding (see LlamaDecoder); None: none.
  remat_policy: rematerialisation of each decoder layer and vision block in training, a name in
    dvl_jax.nn.remat.REMAT_POLICIES. A training choice, not a checkpoint property, hence not in ModelConfig;
    the params are the same under every policy. "none" (inference) runs the plain blocks.
  """

  config: ModelConfig
  padded_vocab_size: int | None = None
  remat_policy: str = "none"

  def setup(self):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.vision_model = SiglipVisionTower(cfg.vision, remat_policy=self.remat_policy, **kw)
    if cfg.is_hybrid:
      grid = cfg.vision.image_size // cfg.vision.patch_size
      self.high_res_vision_model = SamHighResTower(cfg.high_res, out_grid=grid, remat_policy=self.remat_policy,
                                                   **kw)
      self.aligner = HybridAligner(cfg.aligner, **kw)
    else:
      self.aligner = MlpAligner(cfg.aligner, **kw)
    self.language_model = LlamaDecoder(cfg.text, padded_vocab_size=self.padded_vocab_size,
                                       remat_policy=self.remat_policy, **kw)

  def encode_images(self, pixel_values: jax.Array, high_res_pixel_values: jax.Array | None = None,
                    frozen_towers: bool = False) -> jax.Array:
    """Normalised images [B, N, S, S, 3] (and, for the hybrid model, the same images at high resolution
    [B, N, S', S', 3]) -> aligned features [B, N * P, D]. Laid out by the plan's vision rules, if any.

    frozen_towers: stop the gradient at the towers' outputs (SigLIP's and SAM's features, before the
    aligner), so a backward pass never enters a tower that is not trained (training/step.py)."""
    stop = jax.lax.stop_gradient if frozen_towers else (lambda x: x)
    b, n = pixel_values.shape[:2]
    with sharding.tower("vision"):
      feats = stop(self.vision_model(pixel_values.reshape(b * n, *pixel_values.shape[2:])))  # [B*N, P, Dv]
      if self.config.is_hybrid:
        if high_res_pixel_values is None:
          raise ValueError("The hybrid model needs high_res_pixel_values beside pixel_values.")
        high = stop(self.high_res_vision_model(
            high_res_pixel_values.reshape(b * n, *high_res_pixel_values.shape[2:])))
        feats = self.aligner(feats, high)  # [B*N, P, D]
      else:
        feats = self.aligner(feats)  # [B*N, P, D]
      return feats.reshape(b, n * feats.shape[1], feats.shape[2])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array,
               pixel_values: jax.Array | None = None, high_res_pixel_values: jax.Array | None = None,
               cache: KVCache | None = None, last_only: bool = False) -> Output:
    """Args:
      input_ids: int [B, T]; each image is `tokens_per_image` consecutive image tokens.
      attention_mask: [B, T], 1 for real tokens.
      positions: int [B, T] RoPE positions.
      pixel_values: optional [B, N, S, S, 3]; slots that no image token refers to are ignored.
      high_res_pixel_values: [B, N, S', S', 3], the same images for the SAM tower (hybrid model only).
      cache: optional KVCache (see LlamaDecoder).
      last_only: logits of the last position only, [B, 1, V].
    Returns:
      Output(logits [B, T, V], the updated cache or None); V is `padded_vocab_size` when set, the padded ids'
      logits masked.
    """
    x = self.embed_inputs(input_ids, pixel_values, high_res_pixel_values)
    return self.language_model(x, positions, attention_mask, cache, last_only)

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                   high_res_pixel_values: jax.Array | None = None, frozen_towers: bool = False) -> jax.Array:
    """The decoder's input embeddings [B, T, D]: token embeddings with the image features spliced in.
    frozen_towers: as `encode_images`."""
    x = self.language_model.embed(input_ids)  # [B, T, D]
    if pixel_values is not None:
      feats = self.encode_images(pixel_values, high_res_pixel_values, frozen_towers)
      x = splice_image_features(x, input_ids == self.config.image_token_id, feats)
    return x

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                    pixel_values: jax.Array | None = None,
                    high_res_pixel_values: jax.Array | None = None, frozen_towers: bool = False) -> jax.Array:
    """The decoder's final normed hidden states [B, T, D] (before lm_head) of a forward without cache, for
    a loss that applies lm_head itself (dvl_jax/training/loss.py). Args as `__call__`; frozen_towers as
    `encode_images`."""
    x = self.embed_inputs(input_ids, pixel_values, high_res_pixel_values, frozen_towers)
    return self.language_model.hidden_states(x, positions, attention_mask)
