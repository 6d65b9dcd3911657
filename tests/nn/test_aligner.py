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
