"""The MLP aligner against transformers' DeepseekVLAligner."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.deepseek_vl.modeling_deepseek_vl import DeepseekVLAligner

from dvl_jax.config import AlignerConfig
from dvl_jax.nn.aligner import MlpAligner
from reference import hf_config, max_rel_err, torch_params


def test_aligner_matches_transformers():
  cfg = hf_config()
  ref = DeepseekVLAligner(cfg).eval()
  aligner = MlpAligner(AlignerConfig(in_dim=cfg.vision_config.hidden_size, out_dim=cfg.text_config.hidden_size))
  x = np.random.default_rng(0).standard_normal((3, 16, cfg.vision_config.hidden_size)).astype(np.float32)
  params = torch_params(aligner, ref, jnp.asarray(x))
  with torch.no_grad():
    expected = ref(torch.tensor(x)).numpy()
  assert max_rel_err(aligner.apply({"params": params}, jnp.asarray(x)), expected) < 1e-6


def test_hybrid_aligner_matches_transformers_high_res_first():
  from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import DeepseekVLHybridAligner

  from dvl_jax.nn.aligner import HybridAligner
  from reference import hf_hybrid_config

  cfg = hf_hybrid_config()
  ref = DeepseekVLHybridAligner(cfg).eval()
  aligner = HybridAligner(AlignerConfig(kind="hybrid_split_mlp_gelu", in_dim=cfg.vision_config.hidden_size,
                                        high_res_in_dim=4 * cfg.high_res_vision_config.output_channels,
                                        out_dim=cfg.text_config.hidden_size))
  rng = np.random.default_rng(0)
  low = rng.standard_normal((2, 16, cfg.vision_config.hidden_size)).astype(np.float32)
  high = rng.standard_normal((2, 16, 4 * cfg.high_res_vision_config.output_channels)).astype(np.float32)
  params = torch_params(aligner, ref, jnp.asarray(low), jnp.asarray(high))
  with torch.no_grad():
    expected = ref(torch.tensor(low), torch.tensor(high)).numpy()
  assert max_rel_err(aligner.apply({"params": params}, jnp.asarray(low), jnp.asarray(high)), expected) < 1e-6
  # Swapping the branches changes the result: the concatenation order is tested.
  assert max_rel_err(aligner.apply({"params": params}, jnp.asarray(high), jnp.asarray(low)), expected) > 1e-2
