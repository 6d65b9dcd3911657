"""The web demo: chat with a DeepSeek-VL in the browser (Gradio), as the official repo's app does.

  pip install -e ".[demo]"          # Gradio, pinned
  python demo.py [--ckpt DIR] [--host 127.0.0.1] [--port 7860]

Open the printed URL. Upload one or more images with the message box's paperclip (or click an example), ask,
and the answer streams in; later questions see the history. Stop ends the answer being written (it keeps its
text so far), Clear starts over, and the sliders set the sampling (temperature 0 is greedy; they start at the
checkpoint's generation_config.json, else at the official cli_chat.py's defaults). When the history outgrows
the model's context, the oldest turns are left out of the prompt, and the page says so.

Several users: each browser session has its own conversation; answers are generated one at a time, in a queue
that shows each user their place. One user's stop, error or bad upload touches no one else's chat.
--ckpt: a checkpoint converted by convert/torch_to_orbax.py or exported by train.py; without it, the shapes
captioner that ships in the package. The server listens on 127.0.0.1 (this machine only) unless --host says
otherwise, and sends nothing anywhere: Gradio's analytics are off.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(HERE, "examples", "images")
SHAPES_QUESTIONS = ["Describe this image.", "How many shapes are there?", "What colour is the circle?",
                    "Is there a triangle?"]


def parse_args(argv=None) -> argparse.Namespace:
  from dvl_jax.chat.cli import add_model_args, check_model_args

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s; 0.0.0.0 "
                 "opens the demo to your network)")
  p.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    p.error(f"--port must be in 1..65535, got {args.port}.")
  check_model_args(p, args)
  return args


def offline_environment() -> None:
  """No analytics or telemetry; loopback never through a proxy (Gradio's launch() calls its own URL with httpx,
  which honours http(s)_proxy: without this, a proxy setting crashes it; ../shared/WEBDEMO.md)."""
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
  for key in ("NO_PROXY", "no_proxy"):
    hosts = [h for h in os.environ.get(key, "").split(",") if h]
    os.environ[key] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


def chat_view(conversation, pending: str | None = None) -> list[dict]:
  """The conversation as Gradio chatbot messages: each image (shown from its file) then the text of each user
  turn, then the answer; `pending`: the answer being written, for the last turn."""
  from dvl_jax.processing.chat import split_image_tags

  messages = []
  for i, turn in enumerate(conversation.turns):
    messages += [{"role": "user", "content": {"path": name}} for name in turn.names]
    text = " ".join(part for part in split_image_tags(turn.text) if part)
    if text:
      messages.append({"role": "user", "content": text})
    answer = pending if pending is not None and i == len(conversation.turns) - 1 else turn.answer
    if answer is not None:
      messages.append({"role": "assistant", "content": answer})
  return messages


class Session:
  """One browser session's state: its conversation, and whether its user pressed Stop."""

  def __init__(self):
    from dvl_jax.chat import Conversation

    self.conversation = Conversation()
    self.stop = False


def build(bot, examples_dir: str = EXAMPLES_DIR):
  """The Gradio app around a Chatbot (dvl_jax.chat)."""
  import gradio as gr

  from dvl_jax.chat import ContextTooLong, Sampling
  from dvl_jax.processing.images import load_image

  defaults = bot.sampling  # the checkpoint's generation_config.json over the official defaults
  max_new_limit = bot.max_positions // 2  # Chatbot.context_tokens keeps at most half the positions for the answer

  def add_message(message, session):
    """The user's message and uploads -> a new turn (the answer comes from `respond`, queued)."""
    conversation = session.conversation
    text, files = (message or {}).get("text", "").strip(), list((message or {}).get("files") or [])
    if conversation.turns and conversation.turns[-1].answer is None:
      gr.Warning("The last answer is still being written: wait for it, or press Stop.")
      return message, session, chat_view(conversation), ""
    if not text and not files:
      return message, session, chat_view(conversation), "Type a message (and upload images with the clip)."
    images = []
    for path in files:
      try:
        image = load_image(path)
        image.load()
      except (OSError, ValueError) as e:
        gr.Warning(str(e))
        return message, session, chat_view(conversation), (f"Not sent: {os.path.basename(path)} is not a readable "
                                                           "image; remove it and try again.")
      images.append(image)
    try:
      conversation.add_user(text or "Describe this image.", images, files)
    except ValueError as e:  # more <image_placeholder> tags than images
      return message, session, chat_view(conversation), f"Not sent: {e}"
    session.stop = False
    return None, session, chat_view(conversation), ""

  def respond(session, temperature, top_p, repetition_penalty, max_new_tokens):
    """Streams the answer to the last turn: yields (chat, session, status) as the text grows."""
    conversation = session.conversation
    if not conversation.turns or conversation.turns[-1].answer is not None:
      yield gr.skip(), gr.skip(), gr.skip()  # nothing was added (an empty or refused message): leave the page be
      return
    try:
      sampling = Sampling(temperature=float(temperature), top_p=float(top_p),
                          repetition_penalty=float(repetition_penalty), max_new_tokens=int(max_new_tokens))
      reply = bot.reply(conversation, sampling)
    except (ContextTooLong, ValueError) as e:
      conversation.pop()
      yield chat_view(conversation), session, f"Not sent: {e}"
      return
    start = time.perf_counter()
    notice = f"Note: {reply.notice}" if reply.notice else ""
    yield chat_view(conversation, ""), session, notice or "Generating..."
    try:
      for _ in reply:
        if session.stop:  # Stop, pressed in this user's page (its handler runs beside this one, unqueued)
          break
        yield chat_view(conversation, reply.text), session, notice or "Generating..."
    finally:  # also when Clear abandons this generator: the answer keeps its text so far
      reply.close()
    ended = {"stop": "", "length": " (its length limit)", "stopped": " (stopped)"}[reply.finish_reason]
    done = f"Answer {len(conversation.turns)}: {reply.num_tokens} tokens in {time.perf_counter() - start:.1f} s{ended}."
    yield chat_view(conversation), session, " ".join(filter(None, [notice, done]))

  def stop(session):
    session.stop = True

  def clear(session):
    session.stop = True
    session.conversation.reset()
    return session, [], "", None

  title = "# dvl-jax: chat with DeepSeek-VL\n" + f"Model: **{bot.name}**."
  if bot.name.startswith("the shapes captioner"):
    title += (" A small DeepSeek-VL trained from scratch by this repository on pictures of coloured circles, "
              "squares and triangles: it knows nothing else, and it often confuses the kinds of shape. Try the "
              "examples below.")
  with gr.Blocks(title="dvl-jax chat") as demo:
    session = gr.State(Session())
    gr.Markdown(title)
    with gr.Row():
      with gr.Column(scale=3):
        chatbot = gr.Chatbot(elem_id="chat", label="Chat", height=600, buttons=["copy"])
        box = gr.MultimodalTextbox(elem_id="question", file_types=["image"], file_count="multiple",
                                   sources=["upload"], placeholder="Ask about your images (the clip uploads them)",
                                   show_label=False, submit_btn=False)
        with gr.Row():
          send = gr.Button("Send", variant="primary", elem_id="submit")
          stop_button = gr.Button("Stop", elem_id="stop")
          reset = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown(elem_id="status")
      with gr.Column(scale=1):
        temperature = gr.Slider(0, 1.5, value=defaults.temperature if defaults.do_sample else 0, step=0.05,
                                label="Temperature (0: greedy)", elem_id="temperature")
        top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
        repetition_penalty = gr.Slider(1, 2, value=defaults.repetition_penalty, step=0.05,
                                       label="Repetition penalty (1: off)", elem_id="repetition-penalty")
        max_new_tokens = gr.Slider(1, max_new_limit, value=min(defaults.max_new_tokens, max_new_limit), step=1,
                                   label="Max new tokens", elem_id="max-new-tokens")
    if os.path.isdir(examples_dir):
      files = sorted(f for f in os.listdir(examples_dir) if f.lower().endswith((".png", ".jpg", ".jpeg")))
      questions = SHAPES_QUESTIONS if bot.name.startswith("the shapes captioner") else SHAPES_QUESTIONS[:1]
      gr.Examples([[{"text": questions[i % len(questions)], "files": [os.path.join(examples_dir, f)]}]
                   for i, f in enumerate(files)], inputs=[box], label="Examples (click one, then Send)",
                  elem_id="examples")

    sampling = [temperature, top_p, repetition_penalty, max_new_tokens]
    answers = []
    for trigger in (send.click, box.submit):
      added = trigger(add_message, [box, session], [box, session, chatbot, status], queue=False)
      answers.append(added.then(respond, [session, *sampling], [chatbot, session, status]))
    # Stop ends the answer at its next piece, which then shows as final; unqueued, so it is not behind it.
    stop_button.click(stop, [session], None, queue=False)
    for trigger in (reset.click, chatbot.clear):  # the Clear button, and the chat's own trash icon
      trigger(clear, [session], [session, chatbot, status, box], cancels=answers, queue=False)
  # One answer at a time (one model, one device); other users wait in the queue, which shows their place.
  return demo.queue(default_concurrency_limit=1)


def main(argv=None) -> int:
  args = parse_args(argv)
  offline_environment()
  try:
    import gradio  # noqa: F401
  except ImportError:
    print('demo.py: the web demo needs Gradio: pip install -e ".[demo]" (or pip install gradio==6.31.0).',
          file=sys.stderr)
    return 2
  from dvl_jax.chat.cli import load_chatbot

  bot = load_chatbot("demo.py", args)
  if bot is None:
    return 2
  demo = build(bot)
  try:
    demo.launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[EXAMPLES_DIR],
                footer_links=[])
  except OSError as e:  # the port is taken, or the address is not this machine's
    print(f"demo.py: cannot listen on {args.host}:{args.port}: {e} Choose another --port.", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  from dvl_jax.chat.cli import run

  run(main)
