"""Samples -> Examples: ids against transformers' processor, the loss mask read back as text, pixels against
inference preprocessing, and fitting to seq_len / max_images."""

import os

import numpy as np
import pytest

from dvl_jax.data.examples import Overlong, fit, make_example, tokenize_conversation, tokenize_text
from dvl_jax.data.formats import Conversation, Text
from reference import DATA, EOS, assistant, user

DOG, CHART = os.path.join(DATA, "dog_a.png"), os.path.join(DATA, "chart.png")


CONVERSATIONS = {
    "caption": [user(DOG), assistant("A brown dog sits on the grass.")],
    "multi_turn_two_images": [user(DOG, "What is it?"), assistant("A dog."), user(CHART, "And this one?"),
                              assistant("  A chart, naïve 東京 🙂. ")],
    "system_and_text_only": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                             user("What is a dog?"), assistant("An animal.")],
    "ends_with_a_user_turn": [user(DOG, "Describe it."), assistant("A dog."), user("Thanks!")],
}


def _runs(ids, mask):
  """The runs of consecutive learned tokens."""
  cuts = np.flatnonzero(np.diff(mask)) + 1
  return [r for r, m in zip(np.split(ids, cuts), np.split(mask, cuts)) if m[0]]


def _answers(messages):
  return [m["content"][0]["text"].strip() for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_equal_transformers_and_the_learned_tokens_are_the_answers(processors, name):
  ref, ours = processors
  messages = CONVERSATIONS[name]
  ids, mask = tokenize_conversation(ours, messages)
  expected = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                     return_tensors="np")["input_ids"][0].tolist()
  ends_with_answer = messages[-1]["role"] == "assistant"
  assert ids.tolist() == expected + ([ours.tokenizer.eos_token_id] if ends_with_answer else [])
  assert ids.tolist() == ours.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)[0] + (
      [ours.tokenizer.eos_token_id] if ends_with_answer else [])
  learned = [ours.tokenizer.decode(r, skip_special_tokens=False) for r in _runs(ids, mask)]
  assert [t.strip() for t in learned] == [a + EOS for a in _answers(messages)]
  assert not mask[ids == ours.tokenizer.image_token_id].any()


def test_images_are_preprocessed_as_at_inference(processors):
  ref, ours = processors
  messages = CONVERSATIONS["multi_turn_two_images"]
  example = make_example(Conversation(messages, [DOG, CHART]), ours, seq_len=4096, max_images=2, overlong="drop")
  inference = ours.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
  np.testing.assert_array_equal(example.pixel_values, inference["pixel_values"][0])
  expected = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                     return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert np.abs(example.pixel_values - expected).max() < 1e-3
  assert example.num_images == 2 and not example.truncated
  assert example.pixel_values.shape == (2, 32, 32, 3) and example.high_res_pixel_values is None


def test_text_is_bos_text_eos_all_learned(processor):
  tok = processor.tokenizer
  ids, mask = tokenize_text(processor, "A dog sits on the grass.")
  assert ids.tolist() == [tok.bos_token_id] + tok.encode("A dog sits on the grass.", add_special_tokens=False) + [
      tok.eos_token_id]
  assert mask.tolist() == [0] + [1] * (len(ids) - 1)
  example = make_example(Text("A dog."), processor, seq_len=100, max_images=1, overlong="drop")
  assert example.num_images == 0 and example.pixel_values.shape == (0, 32, 32, 3)


# A sample of 30 tokens: text 0-4, image A 5-8, text 9-11, image B 12-15, text 16-29 (4 tokens an image).
IMG = 7


def _sample():
  ids = np.arange(100, 130, dtype=np.int32)
  ids[5:9] = IMG
  ids[12:16] = IMG
  mask = np.zeros(30, np.int32)
  mask[20:] = 1
  return ids, mask


@pytest.mark.parametrize("seq_len, max_images, cut, kept", [
    (30, 2, 30, 2),  # fits
    (25, 2, 25, 2),  # cut in text
    (14, 2, 12, 1),  # 14 falls inside image B: cut before it
    (7, 2, 5, 0),  # inside image A
    (30, 1, 12, 1),  # one image slot: cut before image B
])
def test_fit_cuts_before_whatever_does_not_fit_never_inside_an_image(seq_len, max_images, cut, kept):
  ids, mask = _sample()
  if cut < 30 and not mask[:cut].any():
    with pytest.raises(Overlong, match="nothing to learn is left"):
      fit(ids, mask, image_token_id=IMG, tokens_per_image=4, seq_len=seq_len, max_images=max_images,
          overlong="truncate")
    mask[:] = 1
  out_ids, out_mask, n, truncated = fit(ids, mask, image_token_id=IMG, tokens_per_image=4, seq_len=seq_len,
                                        max_images=max_images, overlong="truncate")
  assert (len(out_ids), n, truncated) == (cut, kept, cut < 30)
  np.testing.assert_array_equal(out_ids, ids[:cut])
  np.testing.assert_array_equal(out_mask, mask[:cut])
  if cut < 30:
    with pytest.raises(Overlong, match=r"over (seq_len|max_images)=\d+ \(overlong='drop'\)"):
      fit(ids, mask, image_token_id=IMG, tokens_per_image=4, seq_len=seq_len, max_images=max_images, overlong="drop")


def test_a_truncated_example_keeps_only_the_images_it_still_holds(processor):
  messages = CONVERSATIONS["multi_turn_two_images"]
  full = make_example(Conversation(messages, [DOG, CHART]), processor, seq_len=4096, max_images=2, overlong="drop")
  second = int(np.flatnonzero(full.ids == processor.tokenizer.image_token_id)[16])  # image 2's first token
  cut = make_example(Conversation(messages, [DOG, CHART]), processor, seq_len=second + 3, max_images=2,
                     overlong="truncate")
  assert cut.truncated and len(cut) == second and cut.num_images == 1
  np.testing.assert_array_equal(cut.pixel_values, full.pixel_values[:1])
