"""Chat with a DeepSeek-VL in the terminal: multi-turn, with images, answers streamed as they are written.

  python chat.py [--ckpt DIR] [--temperature 0.2] [--top-p 0.95] [--repetition-penalty 1.1] [--max-new-tokens 512]
                 [--greedy] [--seed N]

--ckpt: a checkpoint converted by convert/torch_to_orbax.py or exported by train.py; without it, the shapes
captioner that ships in the package (it knows coloured circles, squares and triangles only).

In the chat:
  /image PATH [PATH ...]   attach images (files or http(s) URLs) to your next message; several are fine
  <image_placeholder>      in a message, marks where an image goes: you are asked for its path (as the official
                           cli_chat.py does); "<image>" works too
  /reset                   start a new conversation (forgets the history and attached images)
  /help                    this help
  /exit, Ctrl-D            quit
  Ctrl-C                   stop the answer being written (the chat goes on; the answer keeps its text so far)
The sampling defaults are the checkpoint's generation_config.json's, else the official cli_chat.py's (temperature
0.2, top-p 0.95, repetition penalty 1.1, 512 new tokens; the shipped shapes captioner's: greedy, no penalty);
--greedy (or --temperature 0) decodes greedily, a --temperature above 0 samples. When the history outgrows the
model's context, the oldest turns are left out of the prompt, and the chat says so.
Exit status: 0 after /exit or Ctrl-D, 2 bad arguments or a checkpoint that cannot be loaded.
"""

import argparse
import dataclasses
import shlex
import signal
import sys

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def parse_args(argv=None) -> argparse.Namespace:
  from dvl_jax.chat import Sampling
  from dvl_jax.chat.cli import add_model_args, check_model_args

  official = Sampling()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  default = "default: the checkpoint's generation_config.json, else the official %s"
  p.add_argument("--temperature", type=float, help="0: greedy (" + default % official.temperature + ")")
  p.add_argument("--top-p", type=float, help=f"({default % official.top_p})")
  p.add_argument("--top-k", type=int, help=f"0: off ({default % official.top_k})")
  p.add_argument("--repetition-penalty", type=float, help=f"1.0: off ({default % official.repetition_penalty})")
  p.add_argument("--max-new-tokens", type=int, help=f"({default % official.max_new_tokens})")
  p.add_argument("--greedy", action="store_true", help="greedy decoding (the temperature and top-p are unused)")
  args = p.parse_args(argv)
  # The flags given, over the checkpoint's defaults once it is loaded; a temperature above 0 asks to sample.
  args.sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
  if args.greedy:
    args.sampling["greedy"] = True
  elif args.sampling.get("temperature", 0) > 0:
    args.sampling["greedy"] = False
  try:
    Sampling(**args.sampling)
  except ValueError as e:  # its message names the field; give it the flag's name
    message = str(e)
    for name in SAMPLING_FLAGS:
      message = message.replace(name, "--" + name.replace("_", "-"))
    p.error(message)
  check_model_args(p, args)
  return args


class TerminalChat:
  """The read-answer loop. `run()` returns the exit status."""

  def __init__(self, bot, sampling, out=sys.stdout):
    from dvl_jax.chat import Conversation

    self.bot, self.sampling, self.out = bot, sampling, out
    self.conversation = Conversation()
    self.pending: list[tuple[str, object]] = []  # (name, image) attached to the next message

  def say(self, text: str = "", end: str = "\n") -> None:
    self.out.write(text + end)
    self.out.flush()

  def read(self, prompt: str) -> str | None:
    """A line from the user; None at Ctrl-D. Ctrl-C at the prompt only reminds how to quit."""
    while True:
      try:
        return input(prompt)
      except EOFError:
        self.say()
        return None
      except KeyboardInterrupt:
        self.say("\n(Ctrl-C stops an answer; /exit or Ctrl-D quits.)")

  def run(self) -> int:
    self.say(f"dvl-jax chat with {self.bot.name}. /help for commands; Ctrl-C stops an answer, /exit or Ctrl-D "
             "quits.")
    while True:
      count = len(self.pending)
      line = self.read(f"User{f' [{count} image' + ('s' if count > 1 else '') + ']' if count else ''}: ")
      if line is None:
        return 0
      line = line.strip()
      if not line:
        continue
      if line.startswith("/"):
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
          return 0
        self.command(command, rest.strip())
      else:
        self.ask(line)

  def command(self, command: str, rest: str) -> None:
    if command == "/image":
      self.attach(rest)
    elif command in ("/reset", "/new"):
      self.conversation.reset()
      self.pending.clear()
      self.say("New conversation: the history and attached images are cleared.")
    elif command == "/help":
      self.say(__doc__.split("In the chat:\n", 1)[1].split("Exit status")[0].rstrip())
    else:
      self.say(f"Unknown command {command}; /help lists the commands.")

  def load(self, path: str):
    """The image at `path`, or None after saying why it cannot be used."""
    from dvl_jax.processing.images import load_image

    try:
      image = load_image(path)
      image.load()
      return image
    except (OSError, ValueError) as e:  # missing file, not an image, truncated, unreachable URL
      self.say(str(e))
      return None

  def attach(self, rest: str) -> None:
    try:
      paths = shlex.split(rest)
    except ValueError as e:
      self.say(f"Cannot read the paths ({e}); quote a path with spaces: /image \"my photo.png\".")
      return
    if not paths:
      names = ", ".join(name for name, _ in self.pending) or "none"
      self.say(f"Usage: /image PATH [PATH ...] attaches images to your next message. Attached now: {names}.")
      return
    for path in paths:
      image = self.load(path)
      if image is not None:
        self.pending.append((path, image))
        self.say(f"Attached {path} ({image.width}x{image.height}); it goes with your next message.")

  def inline_images(self, text: str) -> list[tuple[str, object]] | None:
    """Asks for the path of each image tag in `text`; None when the user gives up (an empty line or Ctrl-C)."""
    from dvl_jax.processing.chat import split_image_tags

    count = split_image_tags(text).count(None)
    images: list[tuple[str, object]] = []
    while len(images) < count:
      try:
        path = input(f"({len(images) + 1}/{count}) Image path or URL (empty to cancel the message): ").strip()
      except (KeyboardInterrupt, EOFError):
        path = ""
        self.say()
      path = path[1:-1] if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"" else path
      if not path:
        self.say("Message cancelled.")
        return None
      image = self.load(path)
      if image is not None:
        images.append((path, image))
    return images

  def ask(self, text: str) -> None:
    from dvl_jax.chat import ContextTooLong

    inline = self.inline_images(text)
    if inline is None:
      return
    attached = self.pending + inline
    self.conversation.add_user(text, [image for _, image in attached], [name for name, _ in attached])
    self.pending = []
    replies = []

    def interrupt(signum, frame):  # Ctrl-C: the answer stops at its next token; before it starts, nothing is sent
      if not replies:
        raise KeyboardInterrupt
      replies[0].stop()

    # Once the answer runs, Ctrl-C sets a flag that the answer checks at every token, rather than raising where
    # the signal happens to land (a CI run once saw a Ctrl-C that did not interrupt an answer; not reproduced).
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
      replies.append(self.bot.reply(self.conversation, self.sampling))
      if replies[0].notice:
        self.say(f"[{replies[0].notice}]")
      self.say("Assistant: ", end="")
      for piece in replies[0]:
        self.say(piece, end="")
    except ContextTooLong as e:
      self.conversation.pop()
      self.say(f"Not sent: {e}")
      return
    except KeyboardInterrupt:
      if not replies:  # still preparing the prompt
        self.conversation.pop()
        self.say("\n[stopped: the message was not sent]")
        return
      replies[0].close()
    finally:
      signal.signal(signal.SIGINT, previous)
    self.say({"stopped": " [stopped]", "length": " [cut at the length limit]"}.get(replies[0].finish_reason, ""))


def main(argv=None) -> int:
  # Ctrl-C must reach the chat even when this process started with SIGINT ignored (a non-interactive shell's
  # background job does; an ignored signal stays ignored across exec).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  args = parse_args(argv)
  try:
    import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
  except ImportError:
    pass
  from dvl_jax.chat.cli import load_chatbot

  bot = load_chatbot("chat.py", args)
  if bot is None:
    return 2
  sampling = dataclasses.replace(bot.sampling, **args.sampling)
  print(f"Sampling: {sampling.describe()}.", file=sys.stderr)
  return TerminalChat(bot, sampling).run()


if __name__ == "__main__":
  from dvl_jax.chat.cli import run

  run(main)
