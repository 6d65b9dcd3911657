"""configs/shapes/lookup_probe.py: the text-only lookup probe's examples, its exact-answer score, and a few steps of
each framework's trainer (the JSON lines it reports)."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from dvl_jax.assets import default_checkpoint
from dvl_jax.data import shapes
from training.runs import ROOT

_spec = importlib.util.spec_from_file_location("lookup_probe", os.path.join(ROOT, "configs/shapes/lookup_probe.py"))
probe = importlib.util.module_from_spec(_spec)
sys.modules["lookup_probe"] = probe  # its dataclasses look their module up
_spec.loader.exec_module(probe)

TOKENIZER = os.path.join(default_checkpoint(), "tokenizer.json")
SCENE = shapes.Scene(100, 80, (230, 230, 230), (shapes.Shape("circle", "red", 20, 40, 10),
                                                 shapes.Shape("square", "blue", 70, 40, 10)))


def test_an_example_is_the_question_in_text_and_its_answer_with_eos():
  data = probe.TextExamples(TOKENIZER, ["colour"])
  e = data.encode(SCENE, shapes.Question("colour", "What colour is the square?", "blue"))
  text = data.tokenizer.decode(list(e.prompt), skip_special_tokens=False)
  assert text.endswith("User: Picture: a red circle and a blue square.\nWhat colour is the square?\n\nAssistant:"), text
  assert e.answer[-1] == data.eos and data.tokenizer.decode(list(e.answer[:-1])).strip() == "blue"


def test_drawn_examples_ask_only_the_kinds_given_and_the_held_out_ones_are_fixed():
  data = probe.TextExamples(TOKENIZER, ["exists", "left"])
  for e in data.draw(np.random.default_rng(0), 20):
    question = data.tokenizer.decode(list(e.prompt)).split("\n")[-3]
    assert question.startswith(("Is there", "What is left of")), question
  held = data.held_out(4)
  assert sorted(held) == ["exists1", "exists2", "exists3", "left1", "left2", "left3"]
  assert held == data.held_out(4)
  caption = data.tokenizer.decode(list(held["left3"][0].prompt)).split("Picture: ")[1].split(".")[0]
  assert len(caption.split(", ")) == 2 and " and " in caption  # three shapes


def test_pad_marks_the_answers_and_exact_needs_every_answer_token():
  examples = [probe.Example((1, 5, 6), (7, 0)), probe.Example((1, 5), (9, 8, 0))]
  rows = probe.pad(examples, multiple=4)
  np.testing.assert_array_equal(rows["input_ids"], [[1, 5, 6, 7, 0, 0, 0, 0], [1, 5, 9, 8, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["attention_mask"], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]])
  truth = np.pad(rows["input_ids"][:, 1:], ((0, 0), (0, 1)))  # the next token at each position
  assert probe.exact(truth, examples) == 1.0
  wrong = truth.copy()
  wrong[1, 3] = 5  # the second example's last answer token (its EOS)
  assert probe.exact(wrong, examples) == 0.5


def test_bad_kinds_and_tokenizers_are_refused():
  with pytest.raises(ValueError, match="expected some of count,colour,exists,left"):
    probe.TextExamples(TOKENIZER, ["color"])
  with pytest.raises(SystemExit):
    probe.main(["--tokenizer", os.path.join(ROOT, "README.md")])


@pytest.mark.slow
@pytest.mark.parametrize("framework", probe.FRAMEWORKS)
def test_a_few_steps_of_each_framework_report_their_scores(framework, tmp_path):
  out = tmp_path / "probe.jsonl"
  args = ["--framework", framework, "--kinds", "colour,count", "--steps", "4", "--every", "2", "--held-out", "3",
          "--batch-size", "4", "--width", "32", "--heads", "2", "--layers", "1", "--out", str(out)]
  assert probe.main(args) == 0
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["step"] for line in lines] == [2, 4]
  names = {f"{kind}{k}" for kind in ("colour", "count") for k in (1, 2, 3)}
  for line in lines:
    assert line["framework"] == framework and np.isfinite(line["loss"])
    assert names <= set(line) and all(0.0 <= line[n] <= 1.0 for n in names)
