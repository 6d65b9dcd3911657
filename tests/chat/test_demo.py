"""demo.py in a real browser: Debian's headless Chromium, driven by Playwright, as a person uses the page.

The server runs as a user starts it (python demo.py, its own process); the expected answers come from
Model.generate in this process. DVL_REQUIRE_BROWSER=1 (set by .ci/run) turns a missing Chromium into a failure.
"""

import contextlib
import os
import subprocess
import time
import urllib.request

import pytest

from chat_helpers import (EXAMPLES, PYTHON, ROOT, assistant_message, free_port, generate_answer, user_env,
                      user_message)

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
# ../shared/WEBDEMO.md: Playwright drives Debian's Chromium (no browser download); the resolver rule keeps the
# browser itself off the network, so the page must work from 127.0.0.1 alone.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"]
GREEDY = {}  # Model.generate's defaults, greedy with no penalty: the page's, from the checkpoint's generation_config


@pytest.fixture(scope="module")
def browser():
  if not os.path.exists(CHROMIUM):
    message = f"The browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium."
    if os.environ.get("DVL_REQUIRE_BROWSER"):
      pytest.fail(message)
    pytest.skip(message)
  from playwright.sync_api import sync_playwright

  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@contextlib.contextmanager
def serve(log_dir, *args):
  """python demo.py --port PORT *args, until its page answers; yields its URL and stops it after. Its output goes
  to log_dir/demo.log, shown if it does not start."""
  port = free_port()
  log = open(os.path.join(log_dir, "demo.log"), "w+")
  server = subprocess.Popen([PYTHON, os.path.join(ROOT, "demo.py"), "--port", str(port), *args], cwd=ROOT,
                            env=user_env(), stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.time() + 180
    while True:
      try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if server.poll() is not None or time.time() > deadline:
        log.seek(0)
        raise AssertionError(f"demo.py did not start (exit {server.poll()}):\n{log.read()}")
      time.sleep(0.5)
    yield url
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()


class ChatPage:
  """One user's tab."""

  def __init__(self, browser, url):
    self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
    self.page = self.context.new_page()
    self.requests = []
    self.page.on("request", lambda r: self.requests.append(r.url))
    self.page.goto(url)
    self.page.wait_for_selector("#question textarea")  # the UI renders client-side
    self.answers = 0

  def upload(self, path):
    page = self.page
    with page.expect_response(lambda r: "/upload" in r.url and r.request.method == "POST"):
      page.set_input_files("#question input[type=file]", path)

  def set(self, slider, value):
    box = self.page.locator(f"#{slider} input[type=number]")
    box.fill(str(value))
    box.press("Enter")

  def send(self, text, record=False):
    page = self.page
    page.fill("#question textarea", text)
    if record:  # every text the answer's bubble shows, as the browser renders it
      page.evaluate("""() => { window.states = []; const chat = document.querySelector('#chat');
        new MutationObserver(() => { const bot = chat.querySelectorAll('[data-testid="bot"]');
          if (bot.length) window.states.push(bot[bot.length - 1].innerText); })
        .observe(chat, {subtree: true, childList: true, characterData: true}); }""")
    page.click("#submit")
    self.answers += 1

  def wait_answer(self, timeout_s=120) -> str:
    """Waits for the status line of the answer sent last; returns the answer's text."""
    self.page.wait_for_function(f"() => document.querySelector('#status').innerText.includes('Answer {self.answers}:')",
                                timeout=timeout_s * 1000)
    return self.last_answer()

  def last_answer(self) -> str:
    return self.page.locator('#chat [data-testid="bot"]').last.inner_text().strip()

  def status(self) -> str:
    return self.page.inner_text("#status")


def test_upload_ask_stream_and_follow_up_on_the_shipped_model(browser, shipped, tmp_path):
  model, processor = shipped
  image = os.path.join(EXAMPLES, "shapes_05.jpg")
  with serve(tmp_path) as url:  # no arguments but the port: the shipped model
    user = ChatPage(browser, url)
    user.upload(image)
    assert user.page.input_value("#temperature input[type=number]") == "0"  # the checkpoint's: greedy
    user.send("Describe this image.", record=True)
    first = user.wait_answer()
    expected = generate_answer(model, processor, [user_message("Describe this image.", image)], **GREEDY)
    assert first == expected != ""
    # It streamed: the bubble showed the answer growing, piece by piece, before the whole.
    states = [s.strip() for s in user.page.evaluate("() => window.states") if s.strip()]
    growing = sorted(set(states), key=len)
    assert len(growing) >= 3 and growing[-1] == expected and all(expected.startswith(s) for s in growing), states

    user.send("How many shapes are there?")
    second = user.wait_answer()
    history = [user_message("Describe this image.", image), assistant_message(expected),
               user_message("How many shapes are there?")]
    assert second == generate_answer(model, processor, history, **GREEDY)
    user.page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

    # Clear, then a bundled example: one click fills the message and its image.
    user.page.click("#clear")
    user.page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"bot\"]')")
    user.page.locator("#examples button, #examples tr, #examples .example").nth(2).click()
    user.page.wait_for_function("() => document.querySelector('#question textarea').value.length > 0")
    question = user.page.input_value("#question textarea")
    user.page.click("#submit")
    user.answers = 1  # a new conversation
    third = user.wait_answer()
    example = os.path.join(EXAMPLES, sorted(os.listdir(EXAMPLES))[2])
    assert third == generate_answer(model, processor, [user_message(question, example)], **GREEDY)
    assert all(r.startswith(url) or r.startswith(("data:", "blob:")) for r in user.requests), user.requests


def test_two_users_queue_and_one_users_stop_or_error_leaves_the_other_alone(browser, never_ending_ckpt, tmp_path):
  import dvl_jax

  model, processor = dvl_jax.load(never_ending_ckpt), dvl_jax.Processor.from_pretrained(never_ending_ckpt)
  a_image, b_image = (os.path.join(EXAMPLES, name) for name in ("shapes_00.jpg", "shapes_01.jpg"))
  with serve(tmp_path, "--ckpt", never_ending_ckpt) as url:
    a, b = ChatPage(browser, url), ChatPage(browser, url)
    for user, image in ((a, a_image), (b, b_image)):
      user.upload(image)
    a.set("max-new-tokens", 4000)
    b.set("max-new-tokens", 40)
    a.send("Describe this image.")
    b.send("Describe this image.")  # queued behind a's answer, which runs to 4000 tokens unless stopped
    a.page.wait_for_function("() => { const bot = document.querySelectorAll('#chat [data-testid=\"bot\"]');"
                             " return bot.length && bot[bot.length - 1].innerText.trim().length >= 5; }", timeout=120_000)
    assert "Answer" not in b.status()  # still waiting
    a.page.click("#stop")
    a.page.wait_for_function("() => document.querySelector('#status').innerText.includes('Answer 1:')")
    stopped = a.last_answer()
    assert "(stopped)" in a.status() and stopped != ""

    answer = b.wait_answer()  # b's answer is whole, and exactly what generate writes
    assert "40 tokens" in b.status() and "(its length limit)" in b.status()
    assert answer == generate_answer(model, processor, [user_message("Describe this image.", b_image)],
                                     max_new_tokens=40, **GREEDY)

    broken = tmp_path / "broken.png"  # a truncated PNG: the page takes it, the server cannot read it
    broken.write_bytes(open(os.path.join(ROOT, "tests", "data", "logo.png"), "rb").read()[:200])
    b.upload(str(broken))
    b.send("What is this?")
    b.answers -= 1  # refused: no answer comes
    b.page.wait_for_function("() => document.querySelector('#status').innerText.includes('Not sent')")

    a.set("max-new-tokens", 8)
    a.send("And now?")  # a's chat goes on after its stop, with the stopped answer in its history
    follow_up = a.wait_answer()
    history = [user_message("Describe this image.", a_image), assistant_message(stopped), user_message("And now?")]
    assert follow_up == generate_answer(model, processor, history, max_new_tokens=8, **GREEDY)
    assert len(b.page.locator('#chat [data-testid="bot"]').all()) == 1  # b's chat is as it was
