"""The loss against transformers' (DeepseekVLForConditionalGeneration with labels, ForCausalLMLoss) and
torch.autograd; chunked against plain; the sum/count split over microbatches; padded vocabulary rows; and
the peak memory the chunks save."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from dvl_jax.generate import positions_from_mask
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.training.loss import IGNORE, TokenLoss, cross_entropy, cross_entropy_plain, make_labels
from dvl_jax.training.flops import hlo_matmul_flops
from reference import IMAGE_TOKEN_ID, max_rel_err, random_inputs, to_torch_images

IMAGES = [1, 2]  # both rows hold images; row 0 is left-padded
PAD = [4, 0]


def _reference_labels(ids, mask, loss_mask):
  """The labels written out by hand: the token where it is real text, follows a real token and is learned."""
  labels = ids.astype(np.int64).copy()
  follows_real = np.zeros_like(mask, bool)
  follows_real[:, 1:] = mask[:, :-1] == 1
  labels[(mask == 0) | (ids == IMAGE_TOKEN_ID) | ~loss_mask | ~follows_real] = IGNORE
  return labels


def _hf_loss(ref, ids, mask, pixels, images, labels, **kwargs) -> float:
  t_mask = torch.tensor(mask)
  positions = t_mask.long().cumsum(-1) - 1
  positions.masked_fill_(t_mask == 0, 1)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=t_mask, position_ids=positions,
              pixel_values=to_torch_images(pixels, images), labels=torch.tensor(labels), **kwargs)
  return float(out.loss)


def _our_loss(model, ids, mask, pixels, loss_mask, chunk_size) -> TokenLoss:
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  hidden = model.module.apply({"params": model.params}, ids, mask, positions_from_mask(mask), jnp.asarray(pixels),
                              method=DeepseekVL.hidden_states)  # [B, T, D]
  labels = make_labels(ids, mask, model.config.image_token_id, jnp.asarray(loss_mask))
  kernel = model.params["language_model"]["lm_head"]["kernel"]  # [V, D]
  return cross_entropy(hidden, kernel, labels, model.config.text.vocab_size, chunk_size=chunk_size)


def test_make_labels_masks_padding_images_prompts_and_the_first_token():
  ids = np.array([[1, 1, 9, 5, 5, 7, 8, 2], [9, 5, 5, 10, 11, 12, 2, 1]])
  mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
  loss_mask = np.array([[1, 1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]], bool)  # a user turn at 0:5, 1:3
  labels = make_labels(jnp.asarray(ids), jnp.asarray(mask), IMAGE_TOKEN_ID, jnp.asarray(loss_mask))
  np.testing.assert_array_equal(labels, [[-100, -100, -100, -100, -100, -100, 8, 2],
                                         [-100, -100, -100, -100, 11, 12, 2, -100]])
  np.testing.assert_array_equal(labels, _reference_labels(ids, mask, loss_mask))


def test_make_labels_of_a_packed_row_never_predicts_a_sample_from_the_one_before():
  ids = np.array([[20, 21, 22, 30, 31, 40, 41, 1]])
  segments = np.array([[1, 1, 1, 2, 2, 3, 3, 0]])  # three samples, then padding
  labels = make_labels(jnp.asarray(ids), jnp.asarray(segments), IMAGE_TOKEN_ID)
  np.testing.assert_array_equal(labels, [[-100, 21, 22, -100, 31, -100, 41, -100]])


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [None, 5], ids=["plain", "chunked"])
def test_loss_equals_transformers_on_a_left_padded_batch_with_images(models, chunk_size):
  ref, model = models
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=PAD)
  loss_mask = np.random.default_rng(1).random(ids.shape) < 0.7  # 30% of the tokens are prompt, not learned
  labels = _reference_labels(ids, mask, loss_mask)
  assert (labels != IGNORE).sum() > 10 and ((ids == IMAGE_TOKEN_ID) & (mask == 1)).any()
  ours = _our_loss(model, ids, mask, pixels, loss_mask, chunk_size)
  assert int(ours.count) == (labels[:, 1:] != IGNORE).sum()
  assert abs(float(ours.mean) / _hf_loss(ref, ids, mask, pixels, IMAGES, labels) - 1) < 1e-5
  # Microbatches of one row each, normalised by the whole batch's count (transformers' num_items_in_batch, as
  # its Trainer does under gradient accumulation), add up to the whole batch's loss.
  total = torch.tensor(int(ours.count))
  parts = [_hf_loss(ref, ids[r:r + 1], mask[r:r + 1], pixels[r:r + 1, :k], [k], labels[r:r + 1],
                    num_items_in_batch=total) for r, k in enumerate(IMAGES)]
  assert abs(float(ours.mean) / sum(parts) - 1) < 1e-5


def _random_case(b=3, t=11, d=16, v=40, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((b, t, d)).astype(np.float32)
  kernel = (rng.standard_normal((v, d)) / np.sqrt(d) * 3).astype(np.float32)
  labels = rng.integers(0, v, (b, t))
  labels[rng.random((b, t)) < 0.3] = IGNORE
  labels[0, :4] = IGNORE  # a left-padded row
  return hidden, kernel, labels


@functools.partial(jax.jit, static_argnames=("vocab_size", "chunk_size"))
def _jit_value_and_grads(hidden, kernel, labels, vocab_size=None, chunk_size=None):
  f = lambda h, k: cross_entropy(h, k, labels, vocab_size, chunk_size).mean
  return jax.value_and_grad(f, (0, 1))(hidden, kernel)


def _value_and_grads(hidden, kernel, labels, **kwargs):
  loss, (dh, dk) = _jit_value_and_grads(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels), **kwargs)
  return float(loss), np.asarray(dh), np.asarray(dk)


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["plain", "chunked"])
@pytest.mark.parametrize("pad_rows", [0, 24], ids=["vocab", "padded-vocab"])
def test_value_and_gradients_equal_torch_autograd(chunk_size, pad_rows):
  hidden, kernel, labels = _random_case()
  v = kernel.shape[0]
  h_t = torch.tensor(hidden, requires_grad=True)
  k_t = torch.tensor(kernel, requires_grad=True)
  ref = ForCausalLMLoss(h_t @ k_t.T, torch.tensor(labels), vocab_size=v)
  ref.backward()
  # Padded rows hold large values: were they in the softmax, the loss would move.
  padded = np.concatenate([kernel, 5 * np.ones((pad_rows, kernel.shape[1]), np.float32)])
  loss, dh, dk = _value_and_grads(hidden, padded, labels, vocab_size=v, chunk_size=chunk_size)
  assert abs(loss / ref.item() - 1) < 1e-5
  assert max_rel_err(dh, h_t.grad.numpy()) < 1e-4
  assert max_rel_err(dk[:v], k_t.grad.numpy()) < 1e-4
  assert not dk[v:].any()  # no gradient reaches a padded row


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 11, 64])
def test_chunked_equals_plain(chunk_size):
  hidden, kernel, labels = _random_case()  # T = 11: chunks of 3, 4 and 10 leave a part chunk
  plain = _value_and_grads(hidden, kernel, labels, chunk_size=None)
  chunked = _value_and_grads(hidden, kernel, labels, chunk_size=chunk_size)
  assert abs(chunked[0] / plain[0] - 1) < 1e-6
  for ours, ref in zip(chunked[1:], plain[1:]):
    assert max_rel_err(ours, ref) < 1e-6


def test_microbatch_sums_and_counts_give_the_whole_batch_loss():
  hidden, kernel, labels = _random_case(b=8, seed=2)
  labels[5] = IGNORE  # one row supervises nothing: a plain mean of microbatch means would be wrong
  k = jnp.asarray(kernel)

  @jax.jit
  def whole(h):
    return cross_entropy(h, k, jnp.asarray(labels), chunk_size=4).mean

  @jax.jit
  def split(h):
    parts = [cross_entropy(h[i:i + 2], k, jnp.asarray(labels[i:i + 2]), chunk_size=4) for i in range(0, 8, 2)]
    total = sum(parts[1:], parts[0])
    return total.mean

  h = jnp.asarray(hidden)
  assert abs(float(split(h)) / float(whole(h)) - 1) < 1e-6
  assert max_rel_err(jax.grad(split)(h), jax.grad(whole)(h)) < 1e-6
  means = [float(cross_entropy_plain(h[i:i + 2], k, jnp.asarray(labels[i:i + 2])).mean) for i in range(0, 8, 2)]
  assert abs(np.mean(means) / float(whole(h)) - 1) > 1e-3  # the wrong normalisation would show


def test_padded_vocab_rows_change_nothing():
  hidden, kernel, labels = _random_case(seed=3)
  v = kernel.shape[0]
  padded = np.concatenate([kernel, np.random.default_rng(4).standard_normal((8, kernel.shape[1])).astype(np.float32)])
  for chunk_size in (None, 4):
    real = _value_and_grads(hidden, kernel, labels, chunk_size=chunk_size)
    ours = _value_and_grads(hidden, padded, labels, vocab_size=v, chunk_size=chunk_size)
    assert abs(ours[0] / real[0] - 1) < 1e-6
    assert max_rel_err(ours[1], real[1]) < 1e-6 and max_rel_err(ours[2][:v], real[2]) < 1e-6
    unmasked = _value_and_grads(hidden, padded, labels, chunk_size=chunk_size)  # vocab_size not given
    assert abs(unmasked[0] / real[0] - 1) > 1e-3


def test_nothing_supervised_gives_zero_not_nan():
  hidden, kernel, _ = _random_case()
  labels = np.full(hidden.shape[:2], IGNORE)
  for chunk_size in (None, 4):
    loss, dh, dk = _value_and_grads(hidden, kernel, labels, chunk_size=chunk_size)
    assert loss == 0 and not dh.any() and not dk.any()


def test_bad_inputs_say_what_was_expected():
  hidden, kernel, labels = (jnp.asarray(x) for x in _random_case())
  with pytest.raises(ValueError, match=r"hidden states \[B, T, D\] and labels \[B, T\]"):
    cross_entropy(hidden, kernel, labels[:, 1:])
  with pytest.raises(ValueError, match=r"lm_head's kernel \[V, D=16\]"):
    cross_entropy(hidden, kernel.T, labels)
  with pytest.raises(ValueError, match="vocab_size 41 must lie in"):
    cross_entropy(hidden, kernel, labels, vocab_size=41)
  with pytest.raises(ValueError, match="chunk_size must be a positive"):
    cross_entropy(hidden, kernel, labels, chunk_size=0)
  with pytest.raises(ValueError, match="must have one shape"):
    make_labels(labels, labels[:, 1:], IMAGE_TOKEN_ID)


def _temp_bytes(fn, *shapes) -> int:
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_chunks_cut_the_peak_memory_of_a_4096_token_row():
  """DeepSeek-VL 1.3B's shapes, compiled with abstract inputs (nothing allocated): the temporary buffers of the
  plain loss hold the [T, V] float32 logits (1.6 GiB) and, with gradients, their softmax and cotangent too."""
  b, t, d, v, chunk = 1, 4096, 2048, 102400, 512
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
  mib = 2 ** 20
  sizes = {}
  for name, c in (("plain", None), ("chunked", chunk)):
    loss = lambda h, k, y, c=c: cross_entropy(h, k, y, chunk_size=c).mean
    sizes[name] = (_temp_bytes(loss, *shapes), _temp_bytes(jax.value_and_grad(loss, (0, 1)), *shapes))
  print(f"\ntemp memory, B={b} T={t} D={d} V={v} float32, chunk {chunk}: forward plain "
        f"{sizes['plain'][0] / mib:.0f} MiB, chunked {sizes['chunked'][0] / mib:.0f} MiB; value_and_grad plain "
        f"{sizes['plain'][1] / mib:.0f} MiB, chunked {sizes['chunked'][1] / mib:.0f} MiB")
  assert sizes["plain"][0] >= b * t * v * 4  # the whole logits are there
  assert sizes["chunked"][0] < b * chunk * v * 4 * 1.5  # one chunk's logits, not more
  assert sizes["plain"][0] > 5 * sizes["chunked"][0]
  # With gradients, the chunked loss keeps one [V, D] float32 gradient accumulator (800 MiB) beside a chunk.
  assert sizes["plain"][1] > 3 * sizes["chunked"][1]
  assert sizes["chunked"][1] < (v * d + 3 * b * chunk * v) * 4


def test_chunks_are_even_so_no_logits_are_padded():
  # 608 positions in chunks of at most 512 run as 2 x 304: the compiled loss and gradient multiply 608 positions'
  # hidden states by lm_head four times (forward, the checkpointed chunk's recompute, two gradients), not 1,024.
  b, t, d, v = 1, 608, 8, 32
  labels = jnp.ones((b, t), jnp.int32)
  f = jax.jit(jax.value_and_grad(lambda h, k: cross_entropy(h, k, labels, chunk_size=512).mean, (0, 1)))
  compiled = f.lower(jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32)).compile()
  assert hlo_matmul_flops(compiled.as_text()) == 4 * 2 * b * t * d * v
