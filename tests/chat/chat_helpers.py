"""Helpers of the chat tests (a module of its own: tests/conftest.py is the `conftest` other modules import)."""

import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "images")
PYTHON = sys.executable


def generate_answer(model, processor, messages, **kwargs) -> str:
  """The reference answer: Model.generate on the processor's inputs for the messages, decoded and stripped."""
  inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
  return processor.batch_decode(model.generate(**inputs, **kwargs))[0].strip()


def user_message(text, image=None) -> dict:
  content = [] if image is None else [{"type": "image", "path": image}]
  return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def assistant_message(text) -> dict:
  return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def user_env() -> dict:
  """The environment a user's shell would give chat.py or demo.py: without the test session's simulated devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for key in ("no_proxy", "NO_PROXY"):  # the tests' servers are on this machine
    env[key] = ",".join(filter(None, [env.get(key, ""), "127.0.0.1", "localhost"]))
  env["PYTHONUNBUFFERED"] = "1"
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

