"""Generation against transformers' generate, the samplers against its logits processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import dvl_jax
from dvl_jax.convert import convert_checkpoint
from dvl_jax.generate import GenerationConfig, bucket_length
from dvl_jax.sampling import SamplingConfig, next_tokens, top_k_mask, top_p_mask
from reference import converted, hf_hybrid_model, hf_model, random_inputs, to_torch_images

IMAGES = [2, 0, 1]  # a left-padded batch with two, no and one image
PAD, EOS = 1, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  ref = hf_model("gqa")
  return ref, converted(ref, tmp_path_factory)


def _hf_generate(ref, ids, mask, pixels, images, high=None, **kwargs):
  extra = {} if pixels is None else {"pixel_values": to_torch_images(pixels, images)}
  if high is not None:
    extra["high_res_pixel_values"] = to_torch_images(high, images)
  with torch.no_grad():
    out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=PAD, **extra,
                       **kwargs)
  return out[:, ids.shape[1]:].numpy()


def _assert_same(ours, expected):
  """transformers stops at the longest row; our buffer is max_new_tokens wide and padded."""
  n = expected.shape[1]
  np.testing.assert_array_equal(ours.tokens[:, :n], expected)
  assert (ours.tokens[:, n:] == PAD).all()


def test_greedy_single_prompt_equals_transformers(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, [1])
  expected = _hf_generate(ref, ids, mask, pixels, [1], max_new_tokens=16, do_sample=False, eos_token_id=EOS)
  _assert_same(ours.generate(ids, mask, pixels, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD), expected)


def test_greedy_left_padded_batch_with_0_1_2_images_equals_transformers(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=[0, 5, 2])
  expected = _hf_generate(ref, ids, mask, pixels, IMAGES, max_new_tokens=12, do_sample=False, eos_token_id=EOS)
  out = ours.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
  _assert_same(out, expected)
  # Each row stops at its own EOS: make row 0's third token the end token and check the padding after it.
  stop = int(expected[0, 2])
  expected = _hf_generate(ref, ids, mask, pixels, IMAGES, max_new_tokens=12, do_sample=False,
                          eos_token_id=[EOS, stop])
  out = ours.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=[EOS, stop], pad_token_id=PAD)
  _assert_same(out, expected)
  assert out.lengths[0] == 3 and (out.tokens[0, 3:] == PAD).all()


def test_greedy_with_repetition_penalty_equals_transformers(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=[0, 5, 2], seed=3)
  expected = _hf_generate(ref, ids, mask, pixels, IMAGES, max_new_tokens=12, do_sample=False, eos_token_id=EOS,
                          repetition_penalty=1.3)
  out = ours.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                      repetition_penalty=1.3)
  _assert_same(out, expected)
  assert not (out.tokens == ours.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=EOS).tokens).all()


def test_hybrid_greedy_equals_transformers(tmp_path):
  ref = hf_hybrid_model("window_pads")
  ref.save_pretrained(tmp_path / "hf")
  convert_checkpoint(tmp_path / "hf", tmp_path / "dvl", log=lambda *_: None)
  ours = dvl_jax.load(tmp_path / "dvl")
  ids, mask, pixels, high = random_inputs(ref, [1, 2], pad=[4, 0])
  expected = _hf_generate(ref, ids, mask, pixels, [1, 2], high, max_new_tokens=10, do_sample=False, eos_token_id=EOS)
  _assert_same(ours.generate(ids, mask, pixels, high, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD), expected)


def test_every_generated_token_is_the_argmax_of_a_full_forward(models):
  """The cached decode agrees with a plain forward over prompt + generated tokens at every step."""
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, [1, 0], pad=[0, 3], seed=5)
  out = ours.generate(ids, mask, pixels, max_new_tokens=8)  # no EOS: all 8 steps
  full_ids = np.concatenate([ids, out.tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
  logits = np.asarray(ours(full_ids, full_mask, pixels))
  np.testing.assert_array_equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), out.tokens)


def test_stream_yields_what_generate_returns(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=[0, 5, 2])
  out = ours.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
  steps = list(ours.stream(ids, mask, pixels, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD))
  np.testing.assert_array_equal(np.stack(steps, axis=1), out.tokens[:, :len(steps)])


def test_sampling_is_deterministic_per_seed_and_respects_top_k(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=[0, 5, 2])
  kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=3)
  a = ours.generate(ids, mask, pixels, seed=1, **kw).tokens
  np.testing.assert_array_equal(a, ours.generate(ids, mask, pixels, seed=1, **kw).tokens)
  assert not np.array_equal(a, ours.generate(ids, mask, pixels, seed=2, **kw).tokens)
  # Every sampled token is among the 3 most likely given its prefix.
  full = np.asarray(ours(np.concatenate([ids, a], 1), np.concatenate([mask, np.ones_like(a)], 1), pixels))
  top3 = np.argsort(full[:, ids.shape[1] - 1:-1], axis=-1)[..., -3:]
  assert (top3 == a[..., None]).any(-1).all()


# ----- the samplers on known logits -----

LOGITS = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_mask_equals_transformers(k):
  expected = TopKLogitsWarper(k)(None, torch.tensor(LOGITS)).numpy()
  np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(LOGITS), k)), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_mask_equals_transformers(p):
  expected = TopPLogitsWarper(p)(None, torch.tensor(LOGITS)).numpy()
  ours = np.asarray(top_p_mask(jnp.asarray(LOGITS), p))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
  np.testing.assert_array_equal(ours[~np.isinf(ours)], expected[~np.isinf(expected)])
  assert (~np.isinf(ours)).sum(-1).min() >= 1


def test_known_values():
  logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
  np.testing.assert_array_equal(top_k_mask(logits, 2), [[2.0, 1.0, -np.inf, -np.inf]])
  # softmax = [0.61, 0.22, 0.14, 0.03]: 0.6 needs one token, 0.7 two, 0.9 three.
  for p, kept in ((0.6, 1), (0.7, 2), (0.9, 3)):
    assert int(jnp.isfinite(top_p_mask(logits, p)).sum()) == kept


def test_repetition_penalty_and_temperature_equal_transformers():
  seen_ids = torch.tensor([[1, 3, 3, 7], [0, 0, 49, 2], [5, 6, 7, 8], [9, 9, 9, 9]])
  expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, torch.tensor(LOGITS).clone())
  expected = TemperatureLogitsWarper(0.7)(seen_ids, expected)
  expected = TopKLogitsWarper(1)(seen_ids, expected).argmax(-1).numpy()
  seen = np.zeros(LOGITS.shape, bool)
  np.put_along_axis(seen, seen_ids.numpy(), True, axis=1)
  cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=1, repetition_penalty=1.3)
  ours = next_tokens(jnp.asarray(LOGITS), jnp.asarray(seen), jax.random.key(0), cfg)
  np.testing.assert_array_equal(ours, expected)


# ----- shapes, options and errors -----

def test_prompt_lengths_fall_in_few_buckets():
  buckets = {bucket_length(t) for t in range(1, 8193)}
  assert buckets == {32 * i for i in range(1, 33)} | {128 * i for i in range(9, 33)} | {512 * i for i in range(9, 17)}
  assert all(bucket_length(t) >= t for t in range(1, 8193))
  assert bucket_length(600) == 608 and bucket_length(4097) == 4608 and bucket_length(32) == 32


def test_generation_config_reads_the_checkpoint_file_and_takes_the_callers_ids_first(tmp_path):
  assert GenerationConfig.read(tmp_path) == GenerationConfig()  # no generation_config.json: no EOS, pad 0
  assert GenerationConfig().eos_ids.tolist() == [] and GenerationConfig().pad_id == 0
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 9], "do_sample": true}')
  file = GenerationConfig.read(tmp_path)
  assert file.eos_ids.tolist() == [7, 9] and file.pad_id == 7  # pad: the first EOS, as transformers
  assert file.override(eos_token_id=3).eos_ids.tolist() == [3] and file.override(eos_token_id=3).pad_id == 3
  assert file.override(eos_token_id=[]).eos_ids.tolist() == []  # stop at none, the file notwithstanding
  assert file.override(eos_token_id=0, pad_token_id=5) == GenerationConfig(eos_token_id=(0,), pad_token_id=5)


def test_generation_errors(models):
  ref, ours = models
  ids, mask, pixels = random_inputs(ref, [1])
  with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
    ours.generate(ids, mask, pixels, max_new_tokens=500)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    ours.generate(ids, mask, pixels, do_sample=True, temperature=0.0)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
    ours.generate(ids, mask, pixels, do_sample=True, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    ours.generate(ids, mask, pixels, max_new_tokens=0)


def test_compilation_cache_option(tmp_path):
  previous = jax.config.jax_compilation_cache_dir
  try:
    dvl_jax.enable_compilation_cache(str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    assert any(tmp_path.iterdir()), "nothing was written to the persistent compilation cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
