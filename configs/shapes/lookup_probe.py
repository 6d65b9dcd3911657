"""Can the shapes decoder, trained from scratch, learn the questions' lookups from text alone? A probe.

  python configs/shapes/lookup_probe.py --kinds colour --steps 1000                     # dvl_jax's train step
  python configs/shapes/lookup_probe.py --kinds colour --steps 1000 --framework torch   # the reference

Each example is one question about a scene given as text, in the shapes model's chat format without the system
prompt or the image:

  User: Picture: a red circle and a blue square.\\nWhat colour is the circle?\\n\\nAssistant: red<eos>

and only the answer and its EOS are learned. A decoder of the `shapes` preset's size (4 x 192 unless told) is
trained from random init, on fresh scenes every step; every --every steps the exact answer (every token of it
the greedy choice, teacher-forced) is scored on fixed held-out examples, per question kind and number of shapes
("colour2": colour questions about scenes of 2 shapes). With --framework torch the same examples, schedule and
AdamW settings train transformers' LlamaForCausalLM with torch.optim.AdamW (torch and transformers are test
dependencies only): if both frameworks learn alike, what the numbers show is the task's, not our trainer's.

What it showed (README, "The shapes captioner"): the colour of a ONE-shape scene is learned in 100 steps (copy
the only colour in the text), but the colour of the named shape among 2 or 3 stays at the level of a guess
among the scene's colours after 4000 steps of 32 in both frameworks; existence questions jump from chance to
~80% near step 1000 (an abrupt transition). The recipe's whole budget is ~30k pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable, Sequence

import numpy as np

from dvl_jax.assets import default_checkpoint
from dvl_jax.data import shapes

EVAL_SEED = 10_000  # held-out examples of k shapes: default_rng(EVAL_SEED + k); training draws from --seed
FRAMEWORKS = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: tuple[int, ...]  # token ids up to "Assistant:"
  answer: tuple[int, ...]  # the answer's ids and EOS: the learned tokens


class TextExamples:
  """Scenes -> tokenised text questions (the module doc's format), with the shapes tokenizer."""

  def __init__(self, tokenizer_file: str, kinds: Sequence[str]):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    unknown = sorted(set(kinds) - set(shapes.QUESTION_KINDS))
    if unknown or not kinds:
      raise ValueError(f"--kinds {','.join(kinds)!r}: expected some of {','.join(shapes.QUESTION_KINDS)}")
    self.kinds = tuple(kinds)
    self.tokenizer = Tokenizer.from_file(tokenizer_file)
    self.eos = self.tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    if self.eos is None:
      raise ValueError(f"{tokenizer_file} has no <｜end▁of▁sentence｜> token: give a shapes tokenizer "
                       "(a shapes processor's or checkpoint's tokenizer.json).")

  def encode(self, scene: shapes.Scene, q: shapes.Question) -> Example:
    prompt = self.tokenizer.encode(f"User: Picture: {shapes.caption(scene)}.\n{q.question}\n\nAssistant:").ids
    answer = self.tokenizer.encode(" " + q.answer, add_special_tokens=False).ids + [self.eos]
    return Example(tuple(prompt), tuple(answer))

  def draw(self, rng: np.random.Generator, count: int, num_shapes: int | None = None,
           kinds: Sequence[str] | None = None) -> list[Example]:
    """`count` examples, each a random scene's random question of `kinds` (default: all the probe's)."""
    out = []
    while len(out) < count:
      scene = shapes.sample_scene(rng, num_shapes)
      qs = [q for q in shapes.drill(scene, rng) if q.kind in (kinds or self.kinds)]
      if qs:
        out.append(self.encode(scene, qs[int(rng.integers(len(qs)))]))
    return out

  def held_out(self, per: int) -> dict[str, list[Example]]:
    """name ("colour2") -> `per` fixed examples of that question kind about scenes of that many shapes."""
    return {f"{kind}{k}": self.draw(np.random.default_rng(EVAL_SEED + k), per, k, [kind])
            for kind in self.kinds for k in (1, 2, 3)}


def pad(examples: Sequence[Example], multiple: int = 16) -> dict[str, np.ndarray]:
  """Right-padded rows: input_ids, attention_mask and loss_mask (the answers) int32 [B, L], L a multiple of
  `multiple` (fewer shapes to compile)."""
  length = max(len(e.prompt) + len(e.answer) for e in examples)
  length = -(-length // multiple) * multiple
  out = {k: np.zeros((len(examples), length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
  for i, e in enumerate(examples):
    ids = e.prompt + e.answer
    out["input_ids"][i, :len(ids)] = ids
    out["attention_mask"][i, :len(ids)] = 1
    out["loss_mask"][i, len(e.prompt):len(ids)] = 1
  return out


def exact(predicted: np.ndarray, examples: Sequence[Example]) -> float:
  """predicted int [B, L]: each position's greedy next token; the share of examples whose every answer token
  is predicted from the tokens before it."""
  ok = [all(predicted[i, len(e.prompt) - 1 + j] == t for j, t in enumerate(e.answer)) for i, e in enumerate(examples)]
  return float(np.mean(ok))


def jax_trainer(args, vocab_size: int) -> tuple[Callable, Callable]:
  """dvl_jax: the `shapes` preset's decoder at the probe's sizes, `jit_train_step` (language_model trained)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dvl_jax.config import preset  # pylint: disable=import-outside-toplevel
  from dvl_jax.model import init_params  # pylint: disable=import-outside-toplevel
  from dvl_jax.nn.vlm import DeepseekVL  # pylint: disable=import-outside-toplevel
  from dvl_jax.training.batch import Batch  # pylint: disable=import-outside-toplevel
  from dvl_jax.training.state import init_train_state  # pylint: disable=import-outside-toplevel
  from dvl_jax.training.step import jit_train_step  # pylint: disable=import-outside-toplevel

  base = preset("shapes")
  text = dataclasses.replace(base.text, vocab_size=vocab_size, num_layers=args.layers, num_heads=args.heads,
                             num_kv_heads=args.heads, embed_dim=args.width, head_dim=args.width // args.heads,
                             attention="xla")
  config = dataclasses.replace(base, text=text, aligner=dataclasses.replace(base.aligner, out_dim=args.width))
  module = DeepseekVL(config)
  optimizer = optimizer_config(args)
  state = init_train_state(init_params(config, seed=args.seed), optimizer)
  step = jit_train_step(module, optimizer, chunk_size=None)

  @jax.jit
  def greedy(params, ids, mask):  # [B, L] -> the greedy next token at each position
    hidden = module.apply({"params": params}, ids, mask, jnp.maximum(jnp.cumsum(mask, 1) - 1, 0), None, None,
                          method=DeepseekVL.hidden_states)
    return jnp.argmax(hidden @ params["language_model"]["lm_head"]["kernel"].T, -1)

  def train(rows: dict[str, np.ndarray]) -> float:
    nonlocal state
    state, metrics = step(state, Batch(**rows))
    return float(metrics["loss"])

  def predict(rows: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(greedy(state.params, rows["input_ids"], rows["attention_mask"]))

  return train, predict


def torch_trainer(args, vocab_size: int) -> tuple[Callable, Callable]:
  """The reference: transformers' LlamaForCausalLM at the same sizes, torch.optim.AdamW with the same betas, eps,
  weight decay, clipping and per-step learning rate (our schedule's values)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel

  from dvl_jax.config import preset  # pylint: disable=import-outside-toplevel

  text = preset("shapes").text
  torch.manual_seed(args.seed)
  model = LlamaForCausalLM(LlamaConfig(
      vocab_size=vocab_size, hidden_size=args.width, intermediate_size=text.mlp_dim, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.heads, rms_norm_eps=text.norm_eps,
      rope_theta=text.rope_theta, max_position_embeddings=text.max_position_embeddings, tie_word_embeddings=False))
  optimizer = optimizer_config(args)
  lr = optimizer.learning_rate_fn()
  opt = torch.optim.AdamW(model.parameters(), lr=float(lr(0)), betas=(optimizer.b1, optimizer.b2),
                          eps=optimizer.eps, weight_decay=optimizer.weight_decay)
  step = 0

  def train(rows: dict[str, np.ndarray]) -> float:
    nonlocal step
    ids = torch.from_numpy(rows["input_ids"]).long()
    labels = torch.where(torch.from_numpy(rows["loss_mask"]).bool(), ids, -100)
    for group in opt.param_groups:
      group["lr"] = float(lr(step))
    loss = model(input_ids=ids, attention_mask=torch.from_numpy(rows["attention_mask"]), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer.clip_norm)
    opt.step()
    opt.zero_grad()
    step += 1
    return loss.item()

  def predict(rows: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(rows["input_ids"]).long(),
                     attention_mask=torch.from_numpy(rows["attention_mask"])).logits
    return logits.argmax(-1).numpy()

  return train, predict


def optimizer_config(args):
  """The probe's OptimizerConfig (the decoder trained; the torch run reads its values too)."""
  from dvl_jax.training.optimizer import OptimizerConfig  # pylint: disable=import-outside-toplevel

  return OptimizerConfig(learning_rate=args.lr, total_steps=args.steps, schedule="cosine",
                         warmup_steps=min(args.warmup, args.steps - 1), final_fraction=0.05, b2=args.b2,
                         weight_decay=args.weight_decay, trainable=("language_model/.*",))


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--framework", choices=FRAMEWORKS, default="jax")
  p.add_argument("--kinds", default="colour", help=f"question kinds, comma-separated, of {shapes.QUESTION_KINDS}")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--b2", type=float, default=0.95)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--every", type=int, default=100, help="score the held-out examples every N steps")
  p.add_argument("--held-out", type=int, default=96, help="held-out examples per question kind and shape count")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", default=None, help="a shapes tokenizer.json (default: the shipped model's)")
  p.add_argument("--out", default=None, help="also write each score as a JSON line here")
  args = p.parse_args(argv)
  if args.steps < 2 or args.batch_size < 1 or args.every < 1 or args.held_out < 1:
    p.error("--steps must be >= 2; --batch-size, --every and --held-out >= 1")
  if args.width % args.heads:
    p.error(f"--heads {args.heads} must divide --width {args.width}")

  tokenizer_file = args.tokenizer or f"{default_checkpoint()}/tokenizer.json"
  try:
    data = TextExamples(tokenizer_file, [k for k in args.kinds.split(",") if k])
  except (ValueError, OSError) as e:  # tokenizers raises Exception subclasses for a missing or bad file
    p.error(str(e))
  except Exception as e:  # pylint: disable=broad-except
    p.error(f"--tokenizer {tokenizer_file!r}: cannot read it as a tokenizer.json ({e})")
  make = jax_trainer if args.framework == "jax" else torch_trainer
  train, predict = make(args, data.tokenizer.get_vocab_size())
  held_out = {name: (pad(rows), rows) for name, rows in data.held_out(args.held_out).items()}
  out = open(args.out, "a", encoding="utf-8") if args.out else None
  rng, start = np.random.default_rng(args.seed), time.time()
  for step in range(1, args.steps + 1):
    loss = train(pad(data.draw(rng, args.batch_size)))
    if step % args.every == 0 or step == args.steps:
      score = {name: round(exact(predict(rows), examples), 3) for name, (rows, examples) in held_out.items()}
      line = {"framework": args.framework, "step": step, "loss": round(loss, 4), "seconds": round(time.time() - start),
              **score}
      print(json.dumps(line), flush=True)
      if out:
        out.write(json.dumps(line) + "\n")
        out.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
