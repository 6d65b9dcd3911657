"""The shapes dataset: scenes keep their rules, images show the shapes their captions name, questions have the
right answers, splits are deterministic and disjoint. (The processor written beside them:
tests/processing/test_tokenizer_training.py.)"""

import json
import os

import numpy as np
import pytest

from dvl_jax.data import shapes

SCENES = [shapes.sample_scene(np.random.default_rng(seed)) for seed in range(300)]


def test_scenes_follow_the_rules():
  counts = {1: 0, 2: 0, 3: 0}
  for scene in SCENES:
    s = scene.shapes
    counts[len(s)] += 1
    short = min(scene.width, scene.height)
    assert shapes.SIDE[0] <= max(scene.width, scene.height) <= shapes.SIDE[1]
    assert max(scene.width, scene.height) / short <= shapes.ASPECT[1] + 0.02
    assert all(s[i].x < s[i + 1].x for i in range(len(s) - 1)), "shapes are listed left to right"
    for a in s:
      assert a.r <= a.x <= scene.width - a.r and a.r <= a.y <= scene.height - a.r, "inside the image"
      for b in s:
        if a is not b:
          assert np.hypot(a.x - b.x, a.y - b.y) >= a.r + b.r + shapes.GAP * short - 1e-6, "no overlap"
          assert abs(a.x - b.x) >= shapes.X_SEPARATION * short - 1e-6, "left to right is unambiguous"
    assert all(197 <= c <= 255 for c in scene.background)
  assert all(n > 60 for n in counts.values()), counts
  kinds = {sh.kind for sc in SCENES for sh in sc.shapes}
  colours = {sh.colour for sc in SCENES for sh in sc.shapes}
  assert kinds == set(shapes.KINDS) and colours == set(shapes.COLOURS)


def _near(pixel, rgb, tol=40):
  return np.abs(pixel.astype(int) - np.array(rgb)).max() <= tol


def test_each_kind_is_drawn_as_itself():
  """Probe points tell the kinds apart: a square fills its corner region, a circle does not; a triangle fills
  below its centre but not its upper left."""
  S = lambda kind, colour, x: shapes.Shape(kind, colour, x, 60.0, 40.0)
  scene = shapes.Scene(300, 120, (230, 230, 230), (S("circle", "red", 50), S("square", "blue", 150),
                                                   S("triangle", "purple", 250)))
  pixels = np.asarray(shapes.render(scene, np.random.default_rng(0)))
  at = lambda x, y: pixels[int(round(y)), int(round(x))]
  for s in scene.shapes:
    colour = shapes.COLOURS[s.colour]
    assert _near(at(s.x, s.y + 0.3 * s.r), colour), s
    assert _near(at(s.x + 0.7 * s.r, s.y - 0.7 * s.r), colour) == (s.kind == "square"), s  # 0.99 r out
    assert _near(at(s.x - 0.6 * s.r, s.y - 0.2 * s.r), colour) == (s.kind != "triangle"), s
  assert _near(at(100, 60), scene.background, tol=25) and _near(at(150, 5), scene.background, tol=25)


@pytest.mark.parametrize("seed", range(20))
def test_random_scenes_show_their_shapes_in_their_colours(seed):
  rng = np.random.default_rng(seed)
  scene = shapes.sample_scene(rng)
  pixels = np.asarray(shapes.render(scene, rng))
  assert pixels.shape == (scene.height, scene.width, 3)
  for s in scene.shapes:
    assert _near(pixels[int(round(s.y + 0.2 * s.r)), int(round(s.x))], shapes.COLOURS[s.colour]), s
  if all(np.hypot(s.x, s.y) > 1.3 * s.r for s in scene.shapes):  # the top-left corner is background
    assert _near(pixels[0, 0], scene.background, tol=25)


def test_captions_name_the_shapes_left_to_right():
  S = lambda kind, colour, x: shapes.Shape(kind, colour, x, 50.0, 10.0)
  scene = shapes.Scene(200, 100, (230, 230, 230), (S("triangle", "green", 20), S("circle", "orange", 90),
                                                   S("square", "yellow", 160)))
  assert shapes.caption(scene) == "a green triangle, an orange circle and a yellow square"
  assert shapes.listing(scene.shapes[1:]) == "an orange circle and a yellow square"
  assert shapes.listing(scene.shapes[:1]) == "a green triangle"


@pytest.mark.parametrize("ask", [shapes.questions, shapes.drill])
def test_questions_have_the_right_answers(ask):
  seen = {k: set() for k in shapes.QUESTION_KINDS}
  for seed, scene in enumerate(SCENES):
    s = scene.shapes
    for q in ask(scene, np.random.default_rng(seed)):
      seen[q.kind].add(q.answer)
      if q.kind == "count":
        assert q.answer == ["one", "two", "three"][len(s) - 1]
      elif q.kind == "colour":
        kind = q.question.removeprefix("What colour is the ").removesuffix("?")
        [shape] = [x for x in s if x.kind == kind]
        assert q.answer == shape.colour
      elif q.kind == "exists":
        thing = q.question.removeprefix("Is there a ").removesuffix("?").split()
        present = any(thing == [x.kind] or thing == [x.colour, x.kind] for x in s)
        assert q.answer == ("yes" if present else "no"), (q, s)
      else:
        ref = q.question.removeprefix("What is left of the ").removesuffix("?").split()
        [i] = [i for i, x in enumerate(s) if ref in ([x.kind], [x.colour, x.kind])]
        assert q.answer == (shapes.listing(s[:i]) if i else "nothing")
  assert seen["exists"] == {"yes", "no"} and seen["count"] == {"one", "two", "three"}
  assert "nothing" in seen["left"] and len(seen["left"]) > 20 and seen["colour"] == set(shapes.COLOURS)


def test_splits_are_deterministic_and_disjoint(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  for d in (a, b):
    for split in ("train", "test"):
      shapes.write_split(str(d), split, 12, seed=3)
  for split in ("train", "test"):
    assert (a / f"{split}.jsonl").read_text() == (b / f"{split}.jsonl").read_text()
    assert (a / "images" / split / "000005.jpg").read_bytes() == (b / "images" / split / "000005.jpg").read_bytes()
  train, test = (shapes.read_split(str(a / f"{s}.jsonl")) for s in ("train", "test"))
  assert {r["caption"] for r in train} != {r["caption"] for r in test}
  assert all(os.path.isfile(r["image"]) for r in train + test)
  record = train[0]
  turns = record["conversations"]
  assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
  asked = {t["value"].removeprefix("<image>\n") for t in turns[::2]}
  assert asked == {shapes.CAPTION_PROMPT} | {q["question"] for q in record["questions"]}
  drills = [json.loads(line) for line in (a / "train_drill.jsonl").read_text().splitlines()]
  assert [d["image"] for d in drills] == [f"images/train/{i:06d}.jpg" for i in range(12)]
  assert (a / "train_drill.jsonl").read_text() == (b / "train_drill.jsonl").read_text()


def test_the_drill_asks_every_question_a_scene_allows_and_leaves_the_other_files_as_they_were(tmp_path):
  for seed, scene in enumerate(SCENES):
    rng = np.random.default_rng(seed)
    drill = shapes.drill(scene, rng)
    by_kind = {k: [q for q in drill if q.kind == k] for k in shapes.QUESTION_KINDS}
    kinds, names = [s.kind for s in scene.shapes], [s.name for s in scene.shapes]
    assert len(by_kind["count"]) == 1
    assert len(by_kind["colour"]) == sum(kinds.count(k) == 1 for k in shapes.KINDS)
    assert len(by_kind["left"]) == sum(names.count(n) == 1 for n in names)
    answers = sorted(q.answer for q in by_kind["exists"])
    assert answers == ["no", "yes"] or (answers in (["yes"], ["yes", "yes"]) and len(set(kinds)) == 3)
    assert len(set(drill)) == len(drill)
    chat = shapes.conversation(None, drill, rng)
    assert chat[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in chat) == 1
    asked = [(t["value"].removeprefix("<image>\n"), a["value"]) for t, a in zip(chat[::2], chat[1::2])]
    assert sorted(asked) == sorted((q.question, q.answer) for q in drill)
  # The drill draws from a generator of its own: the chats, captions and images of a split are those the
  # generator wrote before it (the first record of seed 0's test split, as tests/data/shapes_examples.jsonl).
  shapes.write_split(str(tmp_path), "test", 2, seed=0)
  with open(os.path.join(os.path.dirname(__file__), "..", "data", "shapes_examples.jsonl"), encoding="utf-8") as f:
    first = json.loads(f.readline())
  record = shapes.read_split(str(tmp_path / "test.jsonl"))[first["index"]]
  assert (record["caption"], record["questions"]) == (first["caption"], first["questions"])


def test_the_captions_file_pairs_each_image_with_its_caption_alone(tmp_path):
  shapes.write_split(str(tmp_path), "train", 6, seed=2)
  chats = shapes.read_split(str(tmp_path / "train.jsonl"))
  captions = shapes.read_split(str(tmp_path / "train_captions.jsonl"))
  assert [c["image"] for c in captions] == [r["image"] for r in chats]
  for c, r in zip(captions, chats):
    assert c["conversations"] == [{"from": "human", "value": "<image>\n" + shapes.CAPTION_PROMPT},
                                  {"from": "gpt", "value": r["caption"]}]
  assert not list(tmp_path.glob("*.partial"))


def test_score_counts_exact_matches_per_kind():
  records = [{"image": "/a.jpg", "caption": "a red circle",
              "questions": [{"kind": "count", "question": "How many shapes are there?", "answer": "one"},
                            {"kind": "exists", "question": "Is there a square?", "answer": "no"}]},
             {"image": "/b.jpg", "caption": "a blue square",
              "questions": [{"kind": "count", "question": "How many shapes are there?", "answer": "one"}]}]
  generated = {("/a.jpg", shapes.CAPTION_PROMPT): " a red circle\n", ("/a.jpg", "How many shapes are there?"): "two",
               ("/a.jpg", "Is there a square?"): "no", ("/b.jpg", shapes.CAPTION_PROMPT): "a blue squares"}
  s = shapes.score(records, generated)
  assert s["caption"] == {"correct": 1, "total": 2, "accuracy": 0.5}
  assert s["per_kind"]["count"]["correct"] == 0 and s["per_kind"]["exists"]["accuracy"] == 1.0
  assert s["questions"] == {"correct": 1, "total": 3, "accuracy": 1 / 3}
  assert [m["generated"] for m in s["mistakes"]] == ["two", "a blue squares", None]
  assert "caption" in shapes.format_score(s) and json.dumps(s)


def test_cli_refuses_an_existing_dataset(tmp_path, capsys):
  shapes.write_split(str(tmp_path), "train", 2, seed=0)
  with pytest.raises(SystemExit) as e:
    shapes.main([str(tmp_path), "--train", "2"])
  assert e.value.code == 2 and "already holds a dataset" in capsys.readouterr().err


def test_cli_explains_a_directory_it_cannot_write(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(SystemExit) as e:
    shapes.main([str(tmp_path / "a_file" / "shapes"), "--train", "2", "--eval", "1", "--test", "1"])
  assert e.value.code == 2 and "cannot write the dataset to" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_shapes_region_box_is_tight_around_its_drawn_pixels(seed):
  """regions(scene): the pixels of a shape's colour around its box lie in it (within a pixel of antialiasing) and
  reach each side of it."""
  rng = np.random.default_rng(seed)
  scene = shapes.sample_scene(rng, 3)
  pixels = np.asarray(shapes.render(scene, rng), np.float32)
  for s, region in zip(scene.shapes, shapes.regions(scene)):
    assert region["text"] == s.name
    x0, y0, x1, y1 = region["box"]
    near = np.abs(pixels - np.asarray(shapes.COLOURS[s.colour])).max(-1) < 40  # [H, W]
    window = np.zeros_like(near)  # the box and 2 px around it: this shape's pixels, not a neighbour's
    window[max(0, int(y0) - 2):int(y1) + 3, max(0, int(x0) - 2):int(x1) + 3] = True
    near &= window
    ys, xs = np.nonzero(near)
    assert x0 - 1 <= xs.min() <= x0 + 2 and x1 - 2 <= xs.max() + 1 <= x1 + 1, (s, region, xs.min(), xs.max())
    assert y0 - 1 <= ys.min() <= y0 + 2 and y1 - 2 <= ys.max() + 1 <= y1 + 1, (s, region, ys.min(), ys.max())
