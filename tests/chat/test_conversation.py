"""The conversation's prompt is transformers' processor output for the same messages; the oldest turns go first
when the history is too long."""

import os

import numpy as np
import pytest

from dvl_jax.chat import ContextTooLong, Conversation
from dvl_jax.generate import bucket_length
from dvl_jax.processing import Processor, chat
from dvl_jax.processing.images import load_image
from dvl_jax.testing import hf_processor

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
A, B, C = (os.path.join(DATA, name) for name in ("dog_a.png", "chart.png", "monday.jpg"))


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
  """(ours, transformers' DeepseekVLProcessor) from one directory: real geometry, 576 tokens per image."""
  directory = str(tmp_path_factory.mktemp("proc"))
  reference = hf_processor(directory, num_image_tokens=576, size=384, chat_template=chat.hf_chat_template())
  return Processor.from_pretrained(directory), reference


def _image(path):
  return {"type": "image", "path": path}


def _text(text):
  return {"type": "text", "text": text}


def _conversation():
  """Three turns: two images attached before the text, a turn without images, an inline image (unanswered)."""
  conversation = Conversation()
  conversation.add_user("Compare these.", [load_image(A), load_image(B)], [A, B])
  conversation.set_answer("The first is a dog; the second a chart.")
  conversation.add_user("Which is brighter?")
  conversation.set_answer("The chart.")
  conversation.add_user("And <image_placeholder> this one?", [load_image(C)], [C])
  return conversation


# The same conversation as the reference takes it, written by hand from the turns above.
REFERENCE_MESSAGES = [
    {"role": "user", "content": [_image(A), _image(B), _text("Compare these.")]},
    {"role": "assistant", "content": [_text("The first is a dog; the second a chart.")]},
    {"role": "user", "content": [_text("Which is brighter?")]},
    {"role": "assistant", "content": [_text("The chart.")]},
    {"role": "user", "content": [_text("And"), _image(C), _text("this one?")]},
]


def _reference(reference, messages):
  out = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="np")
  return out["input_ids"], out["pixel_values"]


def _assert_inputs_equal(prompt, reference, messages):
  ids, pixels = _reference(reference, messages)
  np.testing.assert_array_equal(prompt.inputs["input_ids"], ids)
  # transformers' pixel_values are [N, 3, S, S] for the batch's images; ours [B, N, S, S, 3]
  ours = prompt.inputs["pixel_values"][0]
  np.testing.assert_allclose(ours, np.transpose(pixels, (0, 2, 3, 1)), atol=1e-6)
  assert prompt.num_tokens == ids.shape[1]


def test_the_whole_history_fits_and_equals_the_reference(processors):
  ours, reference = processors
  prompt = _conversation().fit(ours, max_tokens=16384)
  assert (prompt.dropped, prompt.dropped_images, prompt.notice(16384)) == (0, 0, None)
  assert ours.apply_chat_template(_conversation().messages()) == reference.apply_chat_template(
      REFERENCE_MESSAGES, add_generation_prompt=True)
  _assert_inputs_equal(prompt, reference, REFERENCE_MESSAGES)


def test_the_oldest_turns_are_left_out_whole_with_their_images(processors):
  ours, reference = processors
  full = _reference(reference, REFERENCE_MESSAGES)[0].shape[1]
  last_two = _reference(reference, REFERENCE_MESSAGES[2:])[0].shape[1]
  last = _reference(reference, REFERENCE_MESSAGES[4:])[0].shape[1]
  assert bucket_length(last) < bucket_length(last_two) < bucket_length(full)

  prompt = _conversation().fit(ours, max_tokens=bucket_length(last_two))  # the padded length is what counts
  assert (prompt.dropped, prompt.dropped_images) == (1, 2)
  assert "The oldest turn (with 2 images) no longer fits" in prompt.notice(bucket_length(last_two))
  _assert_inputs_equal(prompt, reference, REFERENCE_MESSAGES[2:])

  prompt = _conversation().fit(ours, max_tokens=bucket_length(last_two) - 1)
  assert (prompt.dropped, prompt.dropped_images) == (2, 2)
  assert "The oldest 2 turns (with 2 images)" in prompt.notice(100)
  _assert_inputs_equal(prompt, reference, REFERENCE_MESSAGES[4:])

  with pytest.raises(ContextTooLong, match=rf"This message is {last} tokens long \(1 image\(s\) x 576"):
    _conversation().fit(ours, max_tokens=bucket_length(last) - 1)


def test_the_history_keeps_every_turn_and_refuses_misuse(processors):
  ours, _ = processors
  conversation = _conversation()
  conversation.fit(ours, max_tokens=1000)  # leaves turns out of the prompt, not of the history
  assert len(conversation.turns) == 3 and conversation.num_images == 3
  with pytest.raises(ValueError, match="last message has no answer yet"):
    conversation.add_user("Another question")
  conversation.set_answer("Monday.")
  with pytest.raises(ValueError, match="2 image tags but 1 image"):
    conversation.add_user("<image> and <image_placeholder>?", [load_image(A)])
  assert len(conversation.turns) == 3  # the refused message was not added
  conversation.reset()
  with pytest.raises(ValueError, match="empty"):
    conversation.fit(ours, max_tokens=1000)
