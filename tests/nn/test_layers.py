"""RMSNorm, LayerNorm, Linear and the MLPs against their PyTorch counterparts."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.llama.modeling_llama import LlamaConfig as HFLlamaConfig, LlamaMLP, LlamaRMSNorm
from transformers.models.siglip.modeling_siglip import SiglipMLP, SiglipVisionConfig

from dvl_jax.nn.layers import GeluMLP, LayerNorm, Linear, RMSNorm, SwiGLU
from reference import max_rel_err, torch_params

X = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32) * 3 + 1


def _run(module, torch_module, x=X):
  params = torch_params(module, torch_module, jnp.asarray(x))
  ours = module.apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    ref = torch_module(torch.tensor(x)).numpy()
  return np.asarray(ours), ref


def test_rmsnorm_matches_llama():
  ref_mod = LlamaRMSNorm(32, eps=1e-6)
  with torch.no_grad():
    ref_mod.weight.normal_()
  ours, ref = _run(RMSNorm(1e-6), ref_mod)
  assert max_rel_err(ours, ref) < 1e-6


def test_layernorm_matches_torch_with_eps_1e_6():
  ref_mod = torch.nn.LayerNorm(32, eps=1e-6)
  with torch.no_grad():
    ref_mod.weight.normal_()
    ref_mod.bias.normal_()
  ours, ref = _run(LayerNorm(1e-6), ref_mod)
  assert max_rel_err(ours, ref) < 1e-6


def test_linear_keeps_torch_layout_and_splits_heads():
  ref_mod = torch.nn.Linear(32, 12)
  ours, ref = _run(Linear((3, 4), ("heads", "head_dim", "embed"), use_bias=True), ref_mod)
  assert ours.shape == (2, 5, 3, 4)
  assert max_rel_err(ours.reshape(2, 5, 12), ref) < 1e-6


def test_swiglu_matches_llama_mlp():
  ref_mod = LlamaMLP(HFLlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu"))
  ours, ref = _run(SwiGLU(48), ref_mod)
  assert max_rel_err(ours, ref) < 1e-6


def test_gelu_mlp_is_exact_gelu_like_siglip():
  ref_mod = SiglipMLP(SiglipVisionConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu"))
  ours, ref = _run(GeluMLP(48), ref_mod)
  assert max_rel_err(ours, ref) < 1e-6
  # The tanh approximation (SigLIP's usual default) is measurably different: the test can tell them apart.
  tanh_ref = SiglipMLP(SiglipVisionConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu_pytorch_tanh"))
  tanh_ref.load_state_dict(ref_mod.state_dict())
  with torch.no_grad():
    assert max_rel_err(ours, tanh_ref(torch.tensor(X)).numpy()) > 1e-5
