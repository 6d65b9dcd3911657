"""Remat of decoder layers and vision blocks: same params, same loss and gradients, less memory."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dvl_jax
from dvl_jax.nn.remat import REMAT_POLICIES, remat
from dvl_jax.nn.sam import SamBlock
from dvl_jax.nn.vlm import DeepseekVL

POLICIES = ("none", "full", "save_dots")


def _inputs(cfg, b=2, t=24, seed=0):
  """A batch with one image per row (its tokens at 2..2+P) and a left-padded second row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.image_token_id, (b, t)).astype(np.int32)
  ids[:, 2:2 + cfg.tokens_per_image] = cfg.image_token_id
  attn = np.ones((b, t), np.int32)
  attn[1, :1] = 0
  pos = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
  s = cfg.vision.image_size
  pixels = rng.standard_normal((b, 1, s, s, 3)).astype(np.float32)
  high = None
  if cfg.is_hybrid:
    hs = cfg.high_res.image_size
    high = rng.standard_normal((b, 1, hs, hs, 3)).astype(np.float32)
  return ids, attn, pos, pixels, high


def _boxed_params(cfg, policy):
  return jax.eval_shape(lambda: DeepseekVL(cfg, remat_policy=policy).init(jax.random.key(0), *_inputs(cfg)))


@pytest.mark.parametrize("preset", ["tiny", "tiny_hybrid"])
def test_remat_keeps_the_param_tree(preset):
  # Same paths, shapes, dtypes and logical axis names (Partitioned's names are tree structure).
  cfg = getattr(dvl_jax, preset)()
  plain = _boxed_params(cfg, "none")
  for policy in ("full", "save_dots"):
    rematted = _boxed_params(cfg, policy)
    assert jax.tree.structure(rematted) == jax.tree.structure(plain)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), rematted) == jax.tree.map(lambda x: (x.shape, x.dtype), plain)


def _loss_and_grads(cfg, params, policy, args):
  weights = jax.random.normal(jax.random.key(1), (*args[0].shape, cfg.text.vocab_size))
  module = DeepseekVL(cfg, remat_policy=policy)
  loss = lambda p: jnp.sum(module.apply({"params": p}, *args).logits * weights)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # three compiles of the tiny model's gradient: ~30 s on the 2-core machine
def test_remat_changes_neither_loss_nor_gradients(preset="tiny"):
  cfg = getattr(dvl_jax, preset)()
  args = _inputs(cfg)
  # Params initialised without remat (as a checkpoint's are) load into every remat model.
  params = nn.meta.unbox(DeepseekVL(cfg).init(jax.random.key(0), *args)["params"])
  ref_loss, ref_grads = _loss_and_grads(cfg, params, "none", args)
  for policy in ("full", "save_dots"):
    loss, grads = _loss_and_grads(cfg, params, policy, args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    # Gradients of every param, the SigLIP (and SAM) blocks' included, to 1e-6, relative to each array's
    # largest entry where that exceeds 1: the recomputed forward is the same ops, but XLA may fuse them
    # differently (seen: 2e-6 absolute on entries up to ~10, float32 rounding). Absolute below 1, since some
    # true gradients are 0 (a key bias shifts every logit of a query alike) and their float noise is no scale.
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      err = float(jnp.max(jnp.abs(g - ref))) / max(float(jnp.max(jnp.abs(ref))), 1.0)
      assert err <= 1e-6, (policy, jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("is_global", [False, True], ids=["windowed", "global"])
def test_a_rematted_sam_block_gives_the_same_output_and_gradients(is_global):
  # SAM's blocks, which the tiny model has not (the whole hybrid model took 40 s of CI here): windows of 3 over a
  # 5 x 5 grid (padded), or global attention with its relative positions.
  cfg = dvl_jax.tiny_hybrid().high_res
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, cfg.embed_dim))
  shapes = nn.meta.unbox(jax.eval_shape(SamBlock(cfg, is_global).init, jax.random.key(1), x)["params"])
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)  # tables too

  def value_and_grads(block):
    loss = lambda p, x: jnp.sum(jnp.sin(block.apply({"params": p}, x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  (ref, ref_grads), (out, grads) = (value_and_grads(b(cfg, is_global)) for b in (SamBlock, remat(SamBlock, "full")))
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert float(jnp.max(jnp.abs(g - r))) <= 1e-6 * max(float(jnp.max(jnp.abs(r))), 1.0)


def _temporaries(policies) -> dict[str, int]:
  """Temporary bytes of the compiled gradient of a 4-layer tiny model at 256 tokens, per remat policy."""
  base = dvl_jax.tiny()
  cfg = base.replace(text=dataclasses.replace(base.text, num_layers=4))
  b, t = 2, 256
  ids, attn = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = jax.eval_shape(lambda: nn.meta.unbox(DeepseekVL(cfg).init(jax.random.key(0), ids[:, :1], attn[:, :1],
                                                                     pos[:, :1])["params"]))
  temp = {}
  for policy in policies:
    module = DeepseekVL(cfg, remat_policy=policy)
    loss = lambda p, module=module: jnp.sum(module.apply({"params": p}, ids, attn, pos).logits)
    temp[policy] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  return temp


@pytest.mark.slow  # three compiles of a 4-layer gradient: ~25 s
def test_full_remat_needs_less_memory():
  # The decoder's activations dominate at a long sequence; with 4 layers the plain backward keeps every layer's
  # attention probabilities [B, N, T, T], full remat only each layer's input. Measured on XLA:CPU: none 41.0 MB,
  # full 9.6 MB, save_dots 19.8 MB of temporaries (8 layers); 21.7, 9.2, 14.6 MB (4 layers).
  # In a process of one CPU device: with the tests' 8 simulated devices dvl_jax leaves XLA:CPU's concurrency-
  # optimised scheduler on (dvl_jax/__init__.py), which orders for parallelism, not memory, and keeps every layer's
  # activations live whatever the policy. The memory-minimising scheduler is what one CPU device (by dvl_jax's
  # default), a GPU or a TPU compile with. The flag is read once per process, hence the subprocess.
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from nn.test_remat import _temporaries; "
          f"print(json.dumps(_temporaries({POLICIES!r})))")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                       env=env, capture_output=True, text=True, check=True).stdout
  temp = json.loads(out.strip().splitlines()[-1])
  assert temp["full"] < 0.5 * temp["none"], temp
  assert temp["save_dots"] < temp["none"], temp


def test_unknown_policy_names_the_valid_ones():
  cfg = dvl_jax.tiny()
  with pytest.raises(ValueError, match=r"Unknown remat_policy 'minimal'.*'full'.*'none'.*'save_dots'"):
    _boxed_params(cfg, "minimal")
  with pytest.raises(ValueError, match="save_dots"):
    remat(SamBlock, "everything")


def test_none_is_the_plain_block():
  assert remat(SamBlock, "none") is SamBlock
  assert set(REMAT_POLICIES) == set(POLICIES)
