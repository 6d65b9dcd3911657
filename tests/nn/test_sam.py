"""The SAM-B trunk pieces and the high-resolution branch against transformers' SAM and DeepSeek-VL hybrid."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import DeepseekVLSamVisionNeck
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionLayer

from dvl_jax.config import SamConfig
from dvl_jax.nn.sam import SamAttention, SamBlock, SamNeck, rel_pos_table, resize_bilinear
from reference import max_rel_err, torch_params

RNG = np.random.default_rng(0)


def _configs(window: int = 3, grid: int = 8):
  hf = SamVisionConfig(hidden_size=16, num_attention_heads=2, image_size=grid * 8, patch_size=8, mlp_dim=32,
                       window_size=window, global_attn_indexes=[1], output_channels=6, layer_norm_eps=1e-6)
  hf._attn_implementation = "eager"
  ours = SamConfig(image_size=grid * 8, patch_size=8, embed_dim=16, mlp_dim=32, num_layers=2, num_heads=2,
                   window_size=window, global_attn_indexes=(1,), neck_dim=6)
  return hf, ours


def _randomise(module):
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0, 0.3)
  return module.eval()


@pytest.mark.parametrize("window,is_global", [(4, False), (3, False), (5, False), (3, True)])
def test_block_matches_transformers(window, is_global):
  """Windows that divide the 8 x 8 grid (4), that need padding (3 -> 9, 5 -> 10), and a global block."""
  hf_cfg, cfg = _configs(window)
  ref = _randomise(SamVisionLayer(hf_cfg, window_size=0 if is_global else window))
  block = SamBlock(cfg, is_global)
  x = RNG.standard_normal((2, 8, 8, 16)).astype(np.float32)
  params = torch_params(block, ref, jnp.asarray(x))
  with torch.no_grad():
    expected = ref(torch.tensor(x))
  expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
  assert max_rel_err(block.apply({"params": params}, jnp.asarray(x)), expected) < 1e-5


def test_relative_position_attention_matches_transformers():
  hf_cfg, cfg = _configs()
  ref = _randomise(SamVisionAttention(hf_cfg, window_size=0))
  attn = SamAttention(cfg, size=8)
  x = RNG.standard_normal((2, 8, 8, 16)).astype(np.float32)
  params = torch_params(attn, ref, jnp.asarray(x))
  with torch.no_grad():
    expected = ref(torch.tensor(x))[0].numpy()
  assert max_rel_err(attn.apply({"params": params}, jnp.asarray(x)), expected) < 1e-5
  # Without the relative positions the output differs: the test sees them.
  params["rel_pos_h"] = np.zeros_like(params["rel_pos_h"])
  assert max_rel_err(attn.apply({"params": params}, jnp.asarray(x)), expected) > 1e-3


@pytest.mark.parametrize("table_len,size", [(15, 8), (27, 8), (9, 14), (27, 14)])
def test_rel_pos_table_interpolates_like_transformers(table_len, size):
  """A table of 2 * size - 1 rows is used as is; any other length is linearly resized first."""
  hf_cfg, _ = _configs()
  table = RNG.standard_normal((table_len, 4)).astype(np.float32)
  expected = SamVisionAttention(hf_cfg, window_size=0).get_rel_pos(size, size, torch.tensor(table)).numpy()
  np.testing.assert_allclose(rel_pos_table(size, jnp.asarray(table)), expected, atol=1e-6)


def test_neck_matches_transformers():
  hf_cfg, cfg = _configs()
  ref = DeepseekVLSamVisionNeck(hf_cfg).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight") else 0.3 * torch.randn_like(p))
  neck = SamNeck(6)
  x = RNG.standard_normal((2, 8, 8, 16)).astype(np.float32)
  params = torch_params(neck, ref, jnp.asarray(x))
  with torch.no_grad():
    expected = ref(torch.tensor(x)).permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
  assert max_rel_err(neck.apply({"params": params}, jnp.asarray(x)), expected) < 1e-5


@pytest.mark.parametrize("src,dst", [(64, 96), (8, 16), (5, 7), (3, 12)])
def test_bilinear_resize_matches_interpolate_at_the_borders(src, dst):
  x = RNG.standard_normal((2, src, src, 3)).astype(np.float32)
  expected = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(dst, dst), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(resize_bilinear(jnp.asarray(x), dst))
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  for edge in (np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1]):  # the borders, where kernels differ
    np.testing.assert_allclose(ours[edge], expected[edge], atol=1e-5)
