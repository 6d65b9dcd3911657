"""The attention implementations against the CPU path: forward and gradients, for each way the model attends."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dvl_jax
from dvl_jax.config import SamConfig
from dvl_jax.convert import convert_checkpoint
from dvl_jax.nn.attention import causal_mask
from dvl_jax.nn.attention_impls import SegmentIds, attend, resolve_attention, splash_attention
from dvl_jax.nn.sam import SamAttention
from reference import hf_logits, hf_model, max_rel_err, random_inputs

RNG = np.random.default_rng(0)


def _normal(*shape):
  return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def _value_and_grads(fn, args, weights, *more_weights):
  """fn(*args) and the gradients of sum(fn(*args) * w) w.r.t. every arg, for `weights` and then each of
  `more_weights`, in one compiled function: (out, grads, more grads...)."""
  def loss(args, w):
    out = fn(*args)
    return jnp.sum(out * w), out

  grad = jax.grad(loss, has_aux=True)

  @jax.jit
  def run(args):
    grads, out = grad(args, weights)
    return (out, grads, *(grad(args, w)[0] for w in more_weights))

  return run(args)


def _assert_close(ours, ref, tol=1e-5):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert max_rel_err(a, b) < tol


def _decoder_case(b, t, s, write_index, pad, written):
  """q [B, T, N, H] (N = 4) and a GQA cache k, v [B, K, S, H] (K = 2); row 1 left-padded by `pad`; slots from
  `written` on not yet written. Returns (q, k, v, mask [B, T, S], valid [B, S])."""
  valid = np.ones((b, s), bool)
  valid[1, :pad] = False
  valid[:, written:] = False
  mask = causal_mask(write_index + jnp.arange(t), jnp.asarray(valid))
  return _normal(b, t, 4, 8), _normal(b, 2, s, 8), _normal(b, 2, s, 8), mask, valid


# 64 queries: the CPU path runs them in 2 causal blocks.
@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_xla_equals_cpu_for_the_decoder(case):
  """A causal prefill of a left-padded GQA batch, and one decode step over a cache with unwritten slots: equal
  outputs and equal gradients w.r.t. q, k and v. Fully masked rows (the padding queries) count in neither, but
  their gradients must be finite: NaN would poison a training step through 0 * NaN."""
  if case == "prefill":
    q, k, v, mask, valid = _decoder_case(2, 64, 64, 0, pad=5, written=64)
    causal, keep = True, valid[:, :, None, None]  # [B, T, 1, 1]: the real queries
  else:
    q, k, v, mask, valid = _decoder_case(2, 1, 16, 9, pad=3, written=10)
    causal, keep = False, np.ones((2, 1, 1, 1), bool)
  weights = _normal(*q.shape) * keep
  results = {}
  for impl in ("cpu", "xla"):
    fn = functools.partial(attend, mask=mask, impl=impl, causal=causal)
    out, grads, everything = _value_and_grads(fn, (q, k, v), weights, jnp.ones_like(weights))  # padding in too
    assert all(np.isfinite(x).all() for x in (out, *grads, *everything)), impl
    results[impl] = out, grads
  (out_cpu, grads_cpu), (out_xla, grads_xla) = results["cpu"], results["xla"]
  assert max_rel_err(out_xla * keep, out_cpu * keep) < 1e-5
  _assert_close(grads_xla, grads_cpu)


def test_xla_equals_cpu_for_siglip_full_attention():
  q, k, v = _normal(2, 24, 2, 8), _normal(2, 2, 24, 8), _normal(2, 2, 24, 8)
  weights = _normal(*q.shape)
  cpu, xla = (_value_and_grads(functools.partial(attend, impl=impl), (q, k, v), weights)
              for impl in ("cpu", "xla"))
  _assert_close(xla, cpu)


@pytest.mark.parametrize("size", [3, 5], ids=["windowed", "global"])
def test_xla_equals_cpu_for_sam_relative_position_attention(size):
  """SAM's attention over windows of 3 (8 of them: 2 images' 5 x 5 grids padded to 6 x 6) or over the whole
  5 x 5 grid, whose relative positions are a bias that depends on q: equal outputs and gradients w.r.t. the
  input and every param (so through q, k, v and the relative-position tables)."""
  cfg = SamConfig(image_size=40, patch_size=8, embed_dim=16, mlp_dim=32, num_layers=2, num_heads=2, window_size=3,
                  global_attn_indexes=(1,), neck_dim=4)
  x = _normal(8, 3, 3, 16) if size == 3 else _normal(2, 5, 5, 16)
  shapes = nn.meta.unbox(jax.eval_shape(SamAttention(cfg, size).init, jax.random.key(0), x))["params"]
  params = jax.tree.map(lambda s: 0.3 * _normal(*s.shape), shapes)  # nonzero relative-position tables too
  weights = _normal(*x.shape)
  cpu, xla = (_value_and_grads(lambda x, p, a=SamAttention(dataclasses.replace(cfg, attention=impl), size):
                               a.apply({"params": p}, x), (x, params), weights) for impl in ("cpu", "xla"))
  _assert_close(xla, cpu)


def test_splash_equals_cpu_in_pallas_interpret_mode():
  """The TPU kernel run by Pallas' interpreter on CPU: a causal prefill of packed rows (segment ids: three
  samples in row 0; left padding, then two samples in row 1) and GQA, against the CPU path with the dense mask
  written out here: equal outputs on the real queries, equal gradients, and finite values on the padding ones
  (which attend the padding before them: no row of the kernel is empty)."""
  t = 128
  segments = np.zeros((2, t), np.int32)
  segments[0] = [1] * 50 + [2] * 40 + [3] * 38
  segments[1, 7:] = [1] * 60 + [2] * 61
  mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)  # [B, T, S]; causal: attend
  q, k, v = _normal(2, t, 4, 8), _normal(2, 2, t, 8), _normal(2, 2, t, 8)
  keep = (segments != 0)[:, :, None, None]
  weights = _normal(*q.shape) * keep
  cpu = _value_and_grads(functools.partial(attend, mask=jnp.asarray(mask), impl="cpu", causal=True), (q, k, v),
                         weights)
  ids = jnp.asarray(segments)
  splash = functools.partial(splash_attention, segment_ids=SegmentIds(ids, ids), causal=True, interpret=True)
  out, grads = _value_and_grads(splash, (q, k, v), weights)
  assert all(np.isfinite(x).all() for x in (out, *grads))
  assert max_rel_err(out * keep, cpu[0] * keep) < 1e-5
  _assert_close(grads, cpu[1])


def test_auto_resolves_by_backend_and_splash_only_where_it_runs():
  prefill = dict(masked=True, segmented=True)
  assert resolve_attention("auto", 256, 256, 128, backend="cpu", **prefill) == "cpu"
  assert resolve_attention("auto", 256, 256, 128, backend="gpu", **prefill) == "xla"
  assert resolve_attention("auto", 256, 256, 128, backend="tpu", **prefill) == "splash"
  assert resolve_attention("auto", 256, 256, 128, backend="tpu") == "splash"  # full attention
  assert resolve_attention("auto", 1, 256, 128, backend="tpu", masked=True) == "xla"  # a decode step
  assert resolve_attention("auto", 576, 576, 64, backend="tpu") == "xla"  # SigLIP-L: 576 is no multiple of 128
  assert resolve_attention("auto", 256, 256, 64, backend="tpu", biased=True) == "xla"  # SAM
  assert resolve_attention("xla", 8, 8, 8, backend="cpu") == "xla"
  with pytest.raises(ValueError, match=r"'splash' is a Pallas TPU kernel and the backend is 'cpu'; use 'xla'"):
    resolve_attention("splash", 256, 256, 128, backend="cpu")
  with pytest.raises(ValueError, match=r"cannot run this attention: the mask came without segment ids"):
    resolve_attention("splash", 1, 256, 128, backend="tpu", masked=True)
  with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash'; expected one of \('auto', "):
    resolve_attention("flash", 8, 8, 8)


def test_tiny_model_with_xla_attention_matches_transformers(tmp_path_factory):
  """The whole tiny model (SigLIP and the decoder, left-padded rows with images) with attention='xla'."""
  ref = hf_model("gqa")
  src, dst = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("dvl") / "ckpt"
  ref.save_pretrained(src)
  convert_checkpoint(src, dst, log=lambda *_: None)
  model = dvl_jax.load(dst, attention="xla")
  assert model.config.text.attention == model.config.vision.attention == "xla"
  ids, mask, pixels = random_inputs(ref, [2, 1], pad=[0, 4])
  assert max_rel_err(model(ids, mask, pixels), hf_logits(ref, ids, mask, pixels, [2, 1]), mask) < 1e-4
