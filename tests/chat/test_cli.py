"""chat.py in a pseudo-terminal, as a person types: images, two turns, /reset, a broken path, Ctrl-C during an
answer, /exit and Ctrl-D."""

import contextlib
import functools
import http.server
import os
import threading

import pexpect
import pytest

from chat_helpers import EXAMPLES, PYTHON, ROOT, assistant_message, generate_answer, user_env, user_message

# pexpect forks this (JAX-threaded) process, and execs chat.py at once: JAX's warning about fork does not apply.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork")]
PROMPT = "User: "
IMAGE_PROMPT = "User [1 image]: "


def _spawn(*args):
  child = pexpect.spawn(PYTHON, [os.path.join(ROOT, "chat.py"), *args], cwd=ROOT, env=user_env(), encoding="utf-8",
                        timeout=120, dimensions=(50, 200))
  child.expect_exact("/help for commands")
  child.expect_exact(PROMPT)
  return child


@contextlib.contextmanager
def _http_server(directory):
  """A local web server for `directory`'s files; yields its URL."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


def _answer(child, prompt=PROMPT) -> str:
  """The answer's line, read up to the next prompt."""
  child.expect_exact("Assistant: ")
  child.expect_exact(prompt)
  return child.before.strip()


def test_a_two_turn_chat_on_the_shipped_model_with_no_arguments(shipped):
  model, processor = shipped
  image = os.path.join(EXAMPLES, "shapes_02.jpg")
  child = _spawn()
  child.sendline(f"/image {image} {EXAMPLES}/no-such-image.png")
  child.expect_exact("Attached")
  child.expect_exact("no-such-image.png' does not exist")  # the broken path is a message; the good one stays
  child.expect_exact(IMAGE_PROMPT)
  child.sendline("Describe this image.")
  first = _answer(child)
  # The shipped model's defaults (its generation_config.json) are greedy: the answers are Model.generate's.
  history = [user_message("Describe this image.", image)]
  assert first == generate_answer(model, processor, history) != ""
  child.sendline("How many shapes are there?")
  history += [assistant_message(first), user_message("How many shapes are there?")]
  assert _answer(child) == generate_answer(model, processor, history)  # the second turn sees the first

  child.sendline("/image tests/data/captions.jsonl")  # not an image
  child.expect_exact("not an image file")
  child.expect_exact(PROMPT)  # nothing attached
  child.sendline("<image_placeholder> What colour is the circle?")  # the official CLI's inline image
  child.expect_exact("(1/1) Image path or URL")
  child.sendline("examples/images/missing.jpg")
  child.expect_exact("does not exist")
  child.expect_exact("(1/1) Image path or URL")
  with _http_server(EXAMPLES) as url:  # an image by URL
    child.sendline(f"{url}/shapes_02.jpg")
    assert _answer(child) in ("red", "green", "blue", "yellow", "purple", "orange")

  child.sendline("/reset")
  child.expect_exact("New conversation")
  child.sendline("/bogus")
  child.expect_exact("Unknown command /bogus")
  child.sendline("/exit")
  child.expect(pexpect.EOF)
  child.close()
  assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(never_ending_ckpt):
  child = _spawn("--ckpt", never_ending_ckpt, "--greedy", "--max-new-tokens", "2000")  # 2000 tokens: many seconds
  child.sendline(f"/image {EXAMPLES}/shapes_00.jpg")
  child.expect_exact(IMAGE_PROMPT)
  for question in ("Describe this image.", "And now?"):  # the second turn: the chat goes on after a stop
    child.sendline(question)
    child.expect_exact("Assistant: ")
    child.expect(r"\S{5}")  # the answer is streaming
    child.sendintr()  # Ctrl-C
    child.expect_exact(" [stopped]")
    child.expect_exact(PROMPT)
  child.sendintr()  # at the prompt: a reminder, not an exit
  child.expect_exact("/exit or Ctrl-D quits")
  child.sendeof()  # Ctrl-D
  child.expect(pexpect.EOF)
  child.close()
  assert child.exitstatus == 0


def test_bad_arguments_exit_2_before_loading():
  for args, message in [(["--ckpt", "/no/such/dir"], "is not a directory"), (["--top-p", "2"], "--top-p must be"),
                        (["--max-new-tokens", "0"], "--max-new-tokens must be")]:
    child = pexpect.spawn(PYTHON, [os.path.join(ROOT, "chat.py"), *args], cwd=ROOT, env=user_env(),
                          encoding="utf-8", timeout=60)
    child.expect_exact(message)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "Loading" not in child.before
