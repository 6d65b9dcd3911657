"""The SigLIP block and tower against transformers' SigLIP as DeepSeek-VL configures it."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer as HFLayer, SiglipVisionConfig

from dvl_jax.config import SiglipConfig
from dvl_jax.nn.siglip import SiglipEncoderLayer
from reference import max_rel_err, torch_params


def test_encoder_layer_matches_transformers():
  hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="gelu",
                              layer_norm_eps=1e-6)
  hf_cfg._attn_implementation = "eager"
  ref_layer = HFLayer(hf_cfg).eval()
  with torch.no_grad():
    for p in ref_layer.parameters():
      p.normal_(0, 0.2)
  layer = SiglipEncoderLayer(SiglipConfig(image_size=32, patch_size=8, embed_dim=32, mlp_dim=64, num_layers=1,
                                          num_heads=4))
  x = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
  params = torch_params(layer, ref_layer, jnp.asarray(x))
  ours, _ = layer.apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    ref = ref_layer(torch.tensor(x), attention_mask=None)
  ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
  assert max_rel_err(ours, ref) < 1e-5
