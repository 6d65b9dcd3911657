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
The sampling defaults are the official cli_chat.py's; --greedy (or --temperature 0) decodes greedily. When the
history outgrows the model's context, the oldest turns are left out of the prompt, and the chat says so.
Exit status: 0 after /exit or Ctrl-D, 2 bad arguments or a checkpoint that cannot be loaded.
"""

import argparse
import os
import shlex
import sys

def parse_args(argv=None) -> argparse.Namespace:
  from dvl_jax.chat import Sampling

  defaults = Sampling()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None, help="a checkpoint directory (default: the shapes captioner shipped in "
                 "the package)")
  p.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy (default: %(default)s)")
  p.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
  p.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off (default: %(default)s)")
  p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                 help="1.0: off (default: %(default)s)")
  p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default: %(default)s)")
  p.add_argument("--greedy", action="store_true", help="greedy decoding (the temperature and top-p are unused)")
  p.add_argument("--seed", type=int, default=None, help="fixes the samples (default: new ones each run)")
  p.add_argument("--max-context-tokens", type=int, default=None,
                 help="the longest prompt to send; older turns are left out (default: what the model takes, "
                      "less the answer's room)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="params and compute dtype (default: the checkpoint's)")
  args = p.parse_args(argv)
  try:
    args.sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                             greedy=args.greedy)
  except ValueError as e:  # its message names the field; give it the flag's name
    message = str(e)
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"):
      message = message.replace(name, "--" + name.replace("_", "-"))
    p.error(message)
  if args.max_context_tokens is not None and args.max_context_tokens < 1:
    p.error(f"--max-context-tokens must be >= 1, got {args.max_context_tokens}.")
  if args.ckpt is not None and not os.path.isdir(args.ckpt):
    p.error(f"--ckpt {args.ckpt!r} is not a directory; give a checkpoint directory written by "
            "convert/torch_to_orbax.py or train.py, or omit --ckpt for the shipped shapes captioner.")
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
    reply = None
    try:
      reply = self.bot.reply(self.conversation, self.sampling)
      if reply.notice:
        self.say(f"[{reply.notice}]")
      self.say("Assistant: ", end="")
      for piece in reply:
        self.say(piece, end="")
    except ContextTooLong as e:
      self.conversation.pop()
      self.say(f"Not sent: {e}")
      return
    except KeyboardInterrupt:
      if reply is None:  # still preparing the prompt: nothing was sent
        self.conversation.pop()
        self.say("\n[stopped: the message was not sent]")
      else:
        reply.close()
        self.say(" [stopped]")
      return
    self.say(" [cut at the length limit]" if reply.finish_reason == "length" else "")


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
  except ImportError:
    pass
  from dvl_jax.chat import Chatbot

  print("Loading the model...", file=sys.stderr, flush=True)
  try:
    bot = Chatbot.load(args.ckpt, dtype=args.dtype, max_context_tokens=args.max_context_tokens, seed=args.seed)
  except (OSError, ValueError) as e:
    print(f"chat.py: cannot load the checkpoint: {e}", file=sys.stderr)
    return 2
  return TerminalChat(bot, args.sampling).run()


if __name__ == "__main__":
  sys.exit(main())
