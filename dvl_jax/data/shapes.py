"""The shapes dataset: synthetic images of 1 to 3 coloured shapes, with captions and questions whose answers are
exact, for training a small DeepSeek-VL from scratch (configs/shapes/) and checking that it learned.

  scene = sample_scene(np.random.default_rng(0))   # Scene(width, height, background, shapes)
  image = render(scene, rng)                       # a PIL image
  caption(scene)                                   # "a green triangle, a red circle and a yellow square"
  questions(scene, rng)                            # [Question("count", "How many shapes are there?", "three"), ...]
  drill(scene, rng)                                # every question the scene allows (stage3_drill.yaml's chats)

  python -m dvl_jax.data.shapes OUT_DIR [--train 20000] [--eval 200] [--test 500] [--seed 0]

writes OUT_DIR/{train,eval,test}.jsonl (LLaVA conversations, plus each image's caption and questions for
scoring), OUT_DIR/{train,eval,test}_captions.jsonl (each image with its caption alone: the image-text
pretraining data), OUT_DIR/{train,eval,test}_drill.jsonl (each image with every question it allows: the chats
of configs/shapes/stage3_drill.yaml), their images under OUT_DIR/images/, and OUT_DIR/processor/: a byte-level
BPE tokenizer trained on the training text with DeepSeek's special tokens, and the image processor
(dvl_jax/processing/tokenizer_training.py).

Scenes: shapes of KINDS in COLOURS, at random sizes and positions, never overlapping and never at the same
horizontal place (so "left to right" is unambiguous), on a light background of random shade with mild noise;
images of random size and aspect ratio. Captions name the shapes left to right. Each split draws from its own
seed (`split_seed`), so a held-out split shares no scene with training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
}
NUMBERS = ("zero", "one", "two", "three")
CAPTION_PROMPT = "Describe this image."
QUESTION_KINDS = ("count", "colour", "exists", "left")
SPLITS = ("train", "eval", "test")

# Geometry, as fractions of the image's short side: a shape's radius (its circumscribed circle), the gap
# between two shapes' circles, and the least horizontal distance between two shapes' centres.
RADIUS = (0.16, 0.24)
GAP = 0.04
X_SEPARATION = 0.15
SIDE = (96, 256)         # the long side, px
ASPECT = (1.0, 1.3)      # long side / short side (the processor pads to a square: wider shrinks the shapes)


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  x: float  # centre, px
  y: float
  r: float  # radius of the circumscribed circle, px

  @property
  def name(self) -> str:
    return f"{self.colour} {self.kind}"

  @property
  def with_article(self) -> str:
    return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


@dataclasses.dataclass(frozen=True)
class Scene:
  width: int
  height: int
  background: tuple[int, int, int]
  shapes: tuple[Shape, ...]  # left to right


@dataclasses.dataclass(frozen=True)
class Question:
  kind: str  # one of QUESTION_KINDS
  question: str
  answer: str


# ----- scenes and images -----
def sample_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
  """A random scene of `num_shapes` (default 1 to 3, uniformly) shapes; kinds and colours may repeat."""
  n = int(rng.integers(1, 4)) if num_shapes is None else num_shapes
  if not 1 <= n <= 3:
    raise ValueError(f"a scene has 1 to 3 shapes, not {n}")
  while True:
    long_side = int(rng.integers(SIDE[0], SIDE[1] + 1))
    short_side = int(round(long_side / rng.uniform(*ASPECT)))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    shapes = _place(rng, n, width, height)
    if shapes is not None:
      break
  shade = int(rng.integers(205, 251))
  background = tuple(int(np.clip(shade + rng.integers(-8, 9), 0, 255)) for _ in range(3))
  return Scene(width, height, background, tuple(sorted(shapes, key=lambda s: s.x)))


def _place(rng: np.random.Generator, n: int, width: int, height: int) -> list[Shape] | None:
  """n non-overlapping, horizontally separated shapes, or None when 100 tries fail (a new canvas is drawn)."""
  short = min(width, height)
  shapes: list[Shape] = []
  for _ in range(100):
    r = rng.uniform(*RADIUS) * short
    x, y = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
    if all(np.hypot(x - s.x, y - s.y) >= r + s.r + GAP * short and abs(x - s.x) >= X_SEPARATION * short
           for s in shapes):
      shapes.append(Shape(str(rng.choice(KINDS)), str(rng.choice(list(COLOURS))), float(x), float(y), float(r)))
      if len(shapes) == n:
        return shapes
  return None


# The drawn shapes, in the shape's radius r: a circle of radius 0.85 r; a square of half-side 0.8 r (about the
# circle's area; its corners just past the shape's circle, within GAP); an equilateral triangle, point up, its
# corners on the shape's circle (these angles).
CIRCLE, SQUARE, TRIANGLE = 0.85, 0.8, np.deg2rad([-90, 30, 150])


def box(s: Shape) -> tuple[float, float, float, float]:
  """The drawn shape's bounding box (x0, y0, x1, y1), px."""
  if s.kind == "triangle":
    half = s.r * np.cos(TRIANGLE[1])
    return (s.x - half, s.y - s.r, s.x + half, s.y + s.r * np.sin(TRIANGLE[1]))
  h = s.r * (CIRCLE if s.kind == "circle" else SQUARE)
  return (s.x - h, s.y - h, s.x + h, s.y + h)


def regions(scene: Scene) -> list[dict]:
  """Each shape's box and name ("red circle"): grounding regions (dvl_jax/data/regions.py)."""
  return [{"box": [round(float(v), 2) for v in box(s)], "text": s.name} for s in scene.shapes]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
  """The scene as an RGB image: each shape's colour jittered a little, then Gaussian noise of sigma 2 to 6."""
  image = Image.new("RGB", (scene.width, scene.height), scene.background)
  draw = ImageDraw.Draw(image)
  for s in scene.shapes:
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[s.colour])
    if s.kind == "circle":
      draw.ellipse(box(s), fill=fill)
    elif s.kind == "square":
      draw.rectangle(box(s), fill=fill)
    else:
      draw.polygon([(s.x + s.r * np.cos(a), s.y + s.r * np.sin(a)) for a in TRIANGLE], fill=fill)
  pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 6), (scene.height, scene.width, 1))
  return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


# ----- text -----
def listing(shapes: Sequence[Shape]) -> str:
  """"a red circle", "an orange circle and a blue square", "a red circle, a blue square and a green triangle"."""
  names = [s.with_article for s in shapes]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(scene: Scene) -> str:
  return listing(scene.shapes)


def questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
  """One question of each kind that the scene allows, in QUESTION_KINDS order:

  count   "How many shapes are there?" -> "two"
  colour  "What colour is the square?" -> "blue"; asked of a kind the scene has exactly once
  exists  "Is there a triangle?" or "Is there a red triangle?" -> "yes" / "no", each half the time
  left    "What is left of the circle?" -> the shapes left of it as a caption names them, or "nothing"; the
          shape is named by its kind, or by colour and kind where the kind repeats (never when both repeat)
  """
  shapes = scene.shapes
  kinds = [s.kind for s in shapes]
  out = [Question("count", "How many shapes are there?", NUMBERS[len(shapes)])]
  single = [k for k in KINDS if kinds.count(k) == 1]
  if single:
    kind = str(rng.choice(single))
    out.append(Question("colour", f"What colour is the {kind}?", shapes[kinds.index(kind)].colour))
  out.append(_exists(scene, rng))
  names = [s.kind if kinds.count(s.kind) == 1 else s.name for s in shapes]
  nameable = [i for i, name in enumerate(names) if sum(s.name == shapes[i].name for s in shapes) == 1]
  if nameable:
    i = int(rng.choice(nameable))
    out.append(Question("left", f"What is left of the {names[i]}?", listing(shapes[:i]) if i else "nothing"))
  return out


def _exists(scene: Scene, rng: np.random.Generator, want: bool | None = None) -> Question:
  """Is there a shape of a kind (or colour and kind, half the time) that the scene has (want) or lacks (want
  False; None: either, each half the time); "yes" where every kind is present and the question names a kind."""
  want = rng.random() < 0.5 if want is None else want
  with_colour = rng.random() < 0.5
  present = {s.name if with_colour else s.kind for s in scene.shapes}
  every = [f"{c} {k}" for c in COLOURS for k in KINDS] if with_colour else list(KINDS)
  pool = sorted(present) if want else [x for x in every if x not in present]
  if not pool:  # every kind is present: the answer can only be yes
    pool, want = sorted(present), True
  return Question("exists", f"Is there a {rng.choice(pool)}?", "yes" if want else "no")


def drill(scene: Scene, rng: np.random.Generator) -> list[Question]:
  """Every question of the kinds of `questions` that the scene allows, in QUESTION_KINDS order (the chats of
  the alternative stage 3, configs/shapes/stage3_drill.yaml): the count, the colour of each kind it has once,
  whether there is a shape it has (yes) and one it lacks (no, where it lacks one), and what is left of each
  shape that can be named. Trained on these, the shapes captioner's existence answers rose from chance to 75%;
  the colour and "left of" lookups did not move (README, "The shapes captioner")."""
  shapes = scene.shapes
  kinds = [s.kind for s in shapes]
  out = [Question("count", "How many shapes are there?", NUMBERS[len(shapes)])]
  out += [Question("colour", f"What colour is the {k}?", shapes[kinds.index(k)].colour)
          for k in KINDS if kinds.count(k) == 1]
  out += dict.fromkeys(_exists(scene, rng, want) for want in (True, False))  # a scene lacking no kind: yes twice, once
  names = [s.kind if kinds.count(s.kind) == 1 else s.name for s in shapes]
  out += [Question("left", f"What is left of the {names[i]}?", listing(shapes[:i]) if i else "nothing")
          for i in range(len(shapes)) if sum(s.name == shapes[i].name for s in shapes) == 1]
  return out


def caption_chat(scene: Scene) -> list[dict]:
  """The image's caption alone, as a one-turn LLaVA conversation (the recipe's image-text pretraining data)."""
  return [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption(scene)}]


def conversation(scene: Scene | None, qs: Sequence[Question], rng: np.random.Generator) -> list[dict]:
  """A LLaVA conversation about the image: the caption request (None: not asked) and every question, in random
  order (each is the first turn, which carries the image, as often as the others)."""
  turns = ([(CAPTION_PROMPT, caption(scene))] if scene is not None else []) + [(q.question, q.answer) for q in qs]
  order = rng.permutation(len(turns))
  out = []
  for j, t in enumerate(order):
    q, a = turns[t]
    out += [{"from": "human", "value": f"<image>\n{q}" if j == 0 else q}, {"from": "gpt", "value": a}]
  return out


# ----- the dataset -----
# The model's sampling defaults (its generation_config.json, which the chat tools read): its answers are exact and
# repeat words ("an orange square and an orange circle"), so greedy, with no repetition penalty.
GENERATION = {"do_sample": False, "repetition_penalty": 1.0}


def split_seed(seed: int, split: str) -> int:
  return seed * 1000 + SPLITS.index(split)


def write_split(out_dir: str, split: str, count: int, seed: int) -> str:
  """`count` images of `split` under out_dir/images/split/ and their records in out_dir/split.jsonl: {"image",
  "conversations", "caption", "questions": [{"kind", "question", "answer"}]} (the scored questions); the same
  images with their captions alone (caption_chat) and each shape's box (`regions`, the grounding data of the
  recipe's stage 0) in out_dir/split_captions.jsonl, and with the chats of their drill (every question, no
  caption; drawn from a generator of their own, so that the other files are as before the drill existed) in
  out_dir/split_drill.jsonl. Returns split.jsonl's path."""
  rng = np.random.default_rng(split_seed(seed, split))
  image_dir = os.path.join(out_dir, "images", split)
  os.makedirs(image_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{split}{suffix}.jsonl") for suffix in ("", "_captions", "_drill")]
  with contextlib.ExitStack() as stack:
    f, fc, fd = (stack.enter_context(open(p + ".partial", "w", encoding="utf-8")) for p in paths)
    for i in range(count):
      scene = sample_scene(rng)
      name = f"images/{split}/{i:06d}.jpg"
      render(scene, rng).save(os.path.join(out_dir, name), quality=92)
      qs = questions(scene, rng)
      record = {"image": name, "conversations": conversation(scene, qs, rng), "caption": caption(scene),
                "questions": [dataclasses.asdict(q) for q in qs]}
      f.write(json.dumps(record) + "\n")
      fc.write(json.dumps({"image": name, "conversations": caption_chat(scene), "regions": regions(scene)}) + "\n")
      own = np.random.default_rng((split_seed(seed, split), i))
      fd.write(json.dumps({"image": name, "conversations": conversation(None, drill(scene, own), own)}) + "\n")
  for p in reversed(paths):
    os.replace(p + ".partial", p)
  return paths[0]


def training_texts(jsonl: str) -> list[str]:
  """Every turn's text of a split (the tokenizer's training corpus)."""
  with open(jsonl, encoding="utf-8") as f:
    return [t["value"].replace("<image>\n", "") for line in f for t in json.loads(line)["conversations"]]


def write_dataset(out_dir: str, *, train: int, eval: int, test: int, seed: int = 0, image_size: int = 64,
                  num_image_tokens: int = 64, vocab_size: int = 512) -> None:
  """The three splits and the processor (tokenizer trained on the training split's text)."""
  from dvl_jax.processing.tokenizer_training import write_processor  # pylint: disable=import-outside-toplevel

  for split, count in (("train", train), ("eval", eval), ("test", test)):
    write_split(out_dir, split, count, seed)
    print(f"{split}: {count} images -> {os.path.join(out_dir, split + '.jsonl')}", flush=True)
  texts = training_texts(os.path.join(out_dir, "train.jsonl")) + list(NUMBERS) + list(COLOURS) + list(KINDS)
  write_processor(os.path.join(out_dir, "processor"), texts, image_size=image_size,
                  num_image_tokens=num_image_tokens, vocab_size=vocab_size, generation=GENERATION)
  print(f"processor -> {os.path.join(out_dir, 'processor')}")


# ----- scoring -----
MAX_ANSWER_TOKENS = 32  # the longest caption is 16 tokens of the shapes tokenizer


def read_split(jsonl: str) -> list[dict]:
  """A split's records, each "image" made an absolute path."""
  root = os.path.dirname(os.path.abspath(jsonl))
  with open(jsonl, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  for r in records:
    r["image"] = os.path.join(root, r["image"])
  return records


def expected_answers(records: Sequence[dict]) -> list[tuple[str, str, str, str]]:
  """(image, prompt, kind, answer) for every image's caption (kind "caption") and questions."""
  out = []
  for r in records:
    out.append((r["image"], CAPTION_PROMPT, "caption", r["caption"]))
    out += [(r["image"], q["question"], q["kind"], q["answer"]) for q in r["questions"]]
  return out


def score(records: Sequence[dict], generated: dict[tuple[str, str], str]) -> dict:
  """Exact-match accuracy (after stripping whitespace) of `generated[(image, prompt)]` per kind ("caption" and
  QUESTION_KINDS), over all questions, and the first few mistakes. A missing answer counts as wrong."""
  per_kind: dict[str, list[int]] = {}
  mistakes = []
  for image, prompt, kind, answer in expected_answers(records):
    got = generated.get((image, prompt))
    right = got is not None and got.strip() == answer
    per_kind.setdefault(kind, [0, 0])[0] += right
    per_kind[kind][1] += 1
    if not right and len(mistakes) < 20:
      mistakes.append({"image": image, "prompt": prompt, "expected": answer, "generated": got})
  kinds = {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in per_kind.items()}
  questions = [per_kind[k] for k in QUESTION_KINDS if k in per_kind]
  correct, total = sum(c for c, _ in questions), sum(n for _, n in questions)
  return {"images": len(records), "caption": kinds.get("caption"),
          "questions": {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0},
          "per_kind": kinds, "mistakes": mistakes}


def format_score(s: dict) -> str:
  rows = [("caption", s["per_kind"].get("caption"))] + [(k, s["per_kind"].get(k)) for k in QUESTION_KINDS]
  rows.append(("all questions", s["questions"]))
  lines = [f"{s['images']} held-out images", f"{'':16}{'exact':>8}{'correct':>10}{'total':>8}"]
  lines += [f"{name:16}{r['accuracy']:8.1%}{r['correct']:10}{r['total']:8}" for name, r in rows if r]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dvl_jax.data.shapes", description=__doc__.split("\n\n")[0])
  p.add_argument("out_dir")
  p.add_argument("--train", type=int, default=20000)
  p.add_argument("--eval", type=int, default=200)
  p.add_argument("--test", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image-size", type=int, default=64, help="the model's image size (the processor resizes to it)")
  p.add_argument("--vocab-size", type=int, default=512)
  args = p.parse_args(argv)
  if os.path.exists(os.path.join(args.out_dir, "train.jsonl")):
    p.error(f"{args.out_dir} already holds a dataset (train.jsonl); give a new directory")
  try:
    write_dataset(args.out_dir, train=args.train, eval=args.eval, test=args.test, seed=args.seed,
                  image_size=args.image_size, vocab_size=args.vocab_size)
  except OSError as e:
    p.error(f"cannot write the dataset to {args.out_dir}: {e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
