"""The chat engine on the shipped model: its answers are model.generate's, the history is used, and however an
answer ends (EOS, length, stop, Ctrl-C), the conversation keeps what was written."""

import os

import pytest

import dvl_jax
from dvl_jax.generate import bucket_length
from dvl_jax.chat import Chatbot, ContextTooLong, Conversation, Sampling
from dvl_jax.processing.images import load_image

from chat_helpers import EXAMPLES, assistant_message, generate_answer, user_message

IMAGE = os.path.join(EXAMPLES, "shapes_02.jpg")
GREEDY = Sampling(temperature=0)  # repetition penalty 1.1, as the official CLI


@pytest.fixture(scope="module")
def bot(shipped):
  model, processor = shipped
  return Chatbot(model, processor, name="shapes", seed=0)


def _generate(bot, messages, **kwargs):
  return generate_answer(bot.model, bot.processor, messages, **kwargs)


def test_greedy_answers_equal_generate_and_the_second_turn_sees_the_first(bot):
  conversation = Conversation()
  conversation.add_user("Describe this image.", [load_image(IMAGE)], [IMAGE])
  reply = bot.reply(conversation, GREEDY)
  pieces = list(reply)
  first = [user_message("Describe this image.", IMAGE)]
  expected = _generate(bot, first, repetition_penalty=1.1, max_new_tokens=reply.max_new_tokens)
  assert len(pieces) > 2 and "".join(pieces) == reply.text == expected != ""
  assert conversation.turns[-1].answer == expected and reply.finish_reason == "stop"
  # The room left in the model's 512 positions (the prompt padded to its bucket), not the default 512.
  assert reply.max_new_tokens == 512 - bucket_length(reply.prompt.num_tokens) < 512

  conversation.add_user("How many shapes are there?")
  reply = bot.reply(conversation, GREEDY)
  second = first + [assistant_message(expected), user_message("How many shapes are there?")]
  assert "".join(reply) == _generate(bot, second, repetition_penalty=1.1, max_new_tokens=reply.max_new_tokens)
  assert reply.prompt.num_tokens > 64 + 20 and reply.prompt.dropped == 0


def test_sampling_follows_its_seed_and_the_official_defaults(bot):
  assert Sampling() == Sampling(temperature=0.2, top_p=0.95, repetition_penalty=1.1, max_new_tokens=512)
  texts = []
  for seed in (3, 3):
    conversation = Conversation()
    conversation.add_user("Describe this image.", [load_image(IMAGE)])
    texts.append("".join(bot.reply(conversation, Sampling(temperature=1.5, top_p=1.0), seed=seed)))
  assert texts[0] == texts[1]
  for bad, message in [(dict(temperature=-1), "temperature must be >= 0"), (dict(top_p=0), "top_p"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty")]:
    with pytest.raises(ValueError, match=message):
      Sampling(**bad)
  assert not Sampling(greedy=True).do_sample and not Sampling(temperature=0).do_sample and Sampling().do_sample


def test_sampling_defaults_come_from_the_checkpoint_then_the_official_cli(tmp_path):
  shipped = Sampling.from_checkpoint(dvl_jax.default_checkpoint())
  assert shipped == Sampling(greedy=True, repetition_penalty=1.0) and not shipped.do_sample
  assert Chatbot.load().sampling == shipped
  assert Sampling.from_checkpoint(tmp_path) == Sampling()  # no generation_config.json
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": 1, "temperature": 0.7, "top_p": 0.9}')
  assert Sampling.from_checkpoint(tmp_path) == Sampling(temperature=0.7, top_p=0.9)
  (tmp_path / "generation_config.json").write_text('{"top_p": 7}')
  with pytest.raises(ValueError, match=r"generation_config.json: top_p must be in \(0, 1\], got 7"):
    Sampling.from_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def endless(never_ending_ckpt):
  return Chatbot.load(never_ending_ckpt, seed=0)


def _ask(bot, text="Describe this image."):
  conversation = Conversation()
  conversation.add_user(text, [load_image(IMAGE)])
  return conversation


def test_a_stopped_answer_keeps_its_text_and_the_chat_goes_on(endless):
  conversation = _ask(endless)
  reply = endless.reply(conversation, Sampling(temperature=0, max_new_tokens=50))
  pieces = iter(reply)
  got = [next(pieces) for _ in range(5)]
  reply.close()  # the web page's Stop: Gradio closes the generator
  assert reply.finish_reason == "stopped" and conversation.turns[-1].answer == "".join(got).rstrip() != ""
  conversation.add_user("And now?")
  reply = endless.reply(conversation, Sampling(temperature=0, max_new_tokens=7))
  list(reply)
  assert reply.finish_reason == "length" and reply.num_tokens == 7

  conversation = _ask(endless)  # chat.py's Ctrl-C: a flag, seen at the next token
  reply = endless.reply(conversation, Sampling(temperature=0, max_new_tokens=50))
  got = ""
  for piece in reply:
    got += piece
    if len(got) >= 3:
      reply.stop()
  assert reply.finish_reason == "stopped" and reply.num_tokens < 50
  assert conversation.turns[-1].answer == got.rstrip() and len(got) >= 3

  conversation = _ask(endless)  # stopped before it began
  reply = endless.reply(conversation, GREEDY)
  reply.close()
  assert reply.finish_reason == "stopped" and conversation.turns[-1].answer == ""


def test_an_interrupt_inside_generation_still_records_the_answer(endless, monkeypatch):
  """Ctrl-C lands wherever Python is, often inside the model's step: the answer so far is kept."""
  stream = endless.model.stream

  def interrupted(*args, **kwargs):
    for n, step in enumerate(stream(*args, **kwargs)):
      if n == 6:
        raise KeyboardInterrupt
      yield step

  monkeypatch.setattr(endless.model, "stream", interrupted)
  conversation = _ask(endless)
  reply = endless.reply(conversation, GREEDY)
  got = ""
  with pytest.raises(KeyboardInterrupt):
    for piece in reply:
      got += piece
  assert reply.finish_reason == "stopped" and reply.num_tokens == 6
  assert conversation.turns[-1].answer == got.rstrip() != ""


def test_the_answer_room_and_the_context_limit(endless):
  positions = endless.max_positions
  assert endless.context_tokens(Sampling(max_new_tokens=64)) == positions - 64
  assert endless.context_tokens(Sampling(max_new_tokens=10_000)) == positions // 2
  bot = Chatbot(endless.model, endless.processor, max_context_tokens=100)
  with pytest.raises(ContextTooLong, match="over the 100 that the model takes"):
    bot.reply(_ask(bot), GREEDY)
  with pytest.raises(ValueError, match="no unanswered user message"):
    conversation = _ask(bot)
    conversation.set_answer("done")
    bot.reply(conversation, GREEDY)


def test_load_opens_the_shipped_model_by_default():
  bot = Chatbot.load()
  assert bot.name.startswith("the shapes captioner") and bot.eos_ids == (1,)
  assert bot.model.config == dvl_jax.load(dvl_jax.default_checkpoint()).config
