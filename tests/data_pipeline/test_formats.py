"""The file formats and record formats users have, and each kind of bad record: counted, reported with file:line
and the reason, skipped, or in strict mode an error that names it."""

import json
import re

import numpy as np
import pytest

from dvl_jax.data import DataConfig, DataError, DataIterator, SourceConfig
from dvl_jax.data.formats import parse
from dvl_jax.data.pipeline import ToExample
from dvl_jax.data.records import open_records
from dvl_jax.data.rows import Skipped
from dvl_jax.processing.images import preprocess
from data_pipeline.conftest import write_jsonl


def _examples(processor, source, **kw):
  """Every record of `source` through the worker's map: Example or Skipped."""
  kw = {"seq_len": 1024, "max_images": 2, "overlong": "truncate", **kw}
  to_example = ToExample((source,), processor, kw["seq_len"], kw["max_images"], kw["overlong"])
  records = open_records(source.path)
  return [to_example((0, records[i])) for i in range(len(records))]


def test_llava_records_become_the_messages_deepseek_renders(processor, images, tmp_path):
  path = write_jsonl(tmp_path / "llava.jsonl", [{
      "image": ["dog_a.png", "chart.png"],
      "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."},
                        {"from": "human", "value": "And <image> this?"}, {"from": "gpt", "value": "A chart."}]}])
  source = SourceConfig(path, "conversations", images=str(images))
  sample = parse(open_records(path)[0].value, source)
  assert sample.images == [str(images / "dog_a.png"), str(images / "chart.png")]
  assert sample.messages == [
      {"role": "user", "content": [{"type": "image", "image": sample.images[0]}, {"type": "text", "text": "What is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
      {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": sample.images[1]},
                                   {"type": "text", "text": "this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]}]
  prompt = processor.apply_chat_template(sample.messages[:1])
  assert prompt.endswith("User: <image_placeholder>What is this?\n\nAssistant:")
  (example,) = _examples(processor, source)
  assert example.num_images == 2 and example.where == f"{path}:1"


def test_transformers_messages_captions_and_text(processor, images, tmp_path):
  messages = [{"role": "user", "content": [{"type": "image", "path": "dog_a.png"}, {"type": "text", "text": "Hi"}]},
              {"role": "assistant", "content": "A dog."}]
  conv = write_jsonl(tmp_path / "messages.jsonl", [{"messages": messages}])
  (example,) = _examples(processor, SourceConfig(conv, "conversations", images=str(images)))
  resolved = [{**messages[0], "content": [{"type": "image", "path": str(images / "dog_a.png")},
                                          messages[0]["content"][1]]}, messages[1]]
  assert example.ids.tolist() == processor.apply_chat_template(resolved, add_generation_prompt=False,
                                                               tokenize=True)[0] + [processor.tokenizer.eos_token_id]
  caps = write_jsonl(tmp_path / "caps.jsonl", [{"jpg": "dog_a.png", "txt": "A dog."}])
  source = SourceConfig(caps, "captions", images=str(images), prompt="Describe it.",
                        columns={"jpg": "image", "txt": "caption"})
  sample = parse(open_records(caps)[0].value, source)
  assert sample.messages == [
      {"role": "user", "content": [{"type": "image", "image": str(images / "dog_a.png")},
                                   {"type": "text", "text": "Describe it."}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]
  text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain text."}])
  (example,) = _examples(processor, SourceConfig(text, "text"))
  assert processor.tokenizer.decode(example.ids) == "Plain text."


def test_parquet_with_image_bytes_and_a_json_list(processor, images, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  dog = (images / "dog_a.png").read_bytes()
  path = str(tmp_path / "caps.parquet")  # Hugging Face's image struct: bytes, or a path when bytes is null
  pq.write_table(pa.table({"image": [{"bytes": dog, "path": "dog_a.png"}, {"bytes": None, "path": "chart.png"}],
                           "caption": ["A dog.", "A chart."]}), path, row_group_size=1)
  examples = _examples(processor, SourceConfig(path, "captions", images=str(images)))
  assert [e.where for e in examples] == [f"{path}:row 0", f"{path}:row 1"]
  dog_pixels = preprocess(dog, processor.image_config)["pixel_values"]
  np.testing.assert_array_equal(examples[0].pixel_values[0], dog_pixels)
  np.testing.assert_array_equal(examples[1].pixel_values[0], preprocess(str(images / "chart.png"),
                                                                         processor.image_config)["pixel_values"])
  raw = str(tmp_path / "raw.parquet")  # a plain binary column under another name
  pq.write_table(pa.table({"jpg": [dog], "txt": ["A dog."]}), raw)
  (example,) = _examples(processor, SourceConfig(raw, "captions", columns={"jpg": "image", "txt": "caption"}))
  np.testing.assert_array_equal(example.pixel_values[0], dog_pixels)
  listed = tmp_path / "llava.json"
  listed.write_text(json.dumps([{"image": "dog_a.png", "conversations": [
      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A dog."}]}] * 2))
  examples = _examples(processor, SourceConfig(str(listed), "conversations", images=str(images)))
  assert [e.where for e in examples] == [f"{listed}[0]", f"{listed}[1]"]


GOOD = {"image": "dog_a.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                {"from": "gpt", "value": "A dog."}]}
BAD = {  # line content -> the reason's pattern
    "missing image": ({**GOOD, "image": "nowhere.png"}, r"image 0: .*nowhere\.png.* does not exist"),
    "corrupt image": ({**GOOD, "image": "corrupt.png"}, r"image 0: .*corrupt\.png"),
    "truncated image": ({**GOOD, "image": "truncated.jpg"}, r"image 0: .*(truncated|broken)"),
    "malformed json": ('{"image": "dog_a.png", "conversations": [', r"malformed JSON: "),
    "tag count": ({**GOOD, "image": ["dog_a.png", "chart.png"]}, r"1 <image> tag\(s\) but 2 image\(s\)"),
    "empty conversation": ({"image": [], "conversations": []}, r"the conversation is empty"),
    "no answer": ({"conversations": [{"from": "human", "value": "Hi"}]}, r"no assistant answer to learn from"),
    "unknown role": ({"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
                     r"turn 0 has the unknown role 'robot'"),
    "not an object": ("[1, 2]", r"expected a JSON object, got list"),
    "messages role": ({"messages": [{"role": "narrator", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                      r"message 0 has the unknown role 'narrator'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_is_skipped_with_file_line_and_reason(processor, images, tmp_path, case):
  line, reason = BAD[case]
  path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", line, GOOD])  # a blank line is not a record
  out = _examples(processor, SourceConfig(path, "conversations", images=str(images)))
  assert [type(x).__name__ for x in out] == ["Example", "Skipped", "Example"]
  skipped = out[1]
  assert skipped.where == f"{path}:3" and skipped.kind == "bad" and skipped.source == "data.jsonl"
  assert re.search(reason, skipped.reason), skipped.reason


def test_a_run_counts_reports_and_skips_bad_records_and_strict_mode_stops(processor, images, tmp_path):
  lines = [GOOD] * 3 + [BAD["missing image"][0], BAD["malformed json"][0], BAD["unknown role"][0]]
  path = write_jsonl(tmp_path / "data.jsonl", lines)
  config = DataConfig([SourceConfig(path, "conversations", images=str(images))], batch_size=2, seq_len=512,
                      shuffle=False, report_every=3)
  logged = []
  with DataIterator(config, processor, process_index=0, process_count=1, run_dir=str(tmp_path),
                    log=logged.append) as data:
    batches = [next(data) for _ in range(3)]  # 6 samples: 2 passes over the file, 6 bad records skipped
  assert sum(b.samples for b in batches) == 6
  assert data.report.counts["bad"] == 6 and data.report.skipped == 6
  report = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
  assert [r["where"] for r in report] == [f"{path}:{i}" for i in (4, 5, 6)] * 2
  assert {r["kind"] for r in report} == {"bad"} and all(r["step"] in (1, 2, 3) for r in report)
  assert any(x.startswith(f"Skipped {path}:5: malformed JSON") for x in logged)
  summaries = [x for x in logged if x.startswith("data: ")]
  assert summaries and "6 of 12 records skipped (6 bad, 0 too long)" in summaries[-1]
  strict = DataConfig(config.sources, batch_size=2, seq_len=512, shuffle=False, strict=True)
  with DataIterator(strict, processor, process_index=0, process_count=1) as data:
    next(data)
    with pytest.raises(DataError, match=rf"{path}:4: image 0: .*nowhere.png.*strict mode stops"):
      next(data)


def test_overlong_samples_are_dropped_or_truncated_and_counted(processor, images, tmp_path):
  long_answer = {**GOOD, "conversations": [GOOD["conversations"][0],
                                           {"from": "gpt", "value": "A dog. " * 200}]}
  path = write_jsonl(tmp_path / "data.jsonl", [GOOD, long_answer])
  source = SourceConfig(path, "conversations", images=str(images))
  short, cut = _examples(processor, source, seq_len=300, overlong="truncate")
  assert len(cut) == 300 and cut.truncated and cut.num_images == 1 and not short.truncated
  _, dropped = _examples(processor, source, seq_len=300, overlong="drop")
  assert isinstance(dropped, Skipped) and dropped.kind == "overlong"
  assert dropped.reason.startswith("too long: ") and "over seq_len=300" in dropped.reason


def test_a_missing_file_or_unknown_kind_is_an_error_before_any_work(processor, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"Data file '.*nope.jsonl' does not exist"):
    DataIterator(DataConfig([SourceConfig(str(tmp_path / "nope.jsonl"), "captions")], batch_size=1), processor,
                 process_index=0, process_count=1)
  (tmp_path / "broken.json").write_text('[{"text": "a"},')
  with pytest.raises(ValueError, match=r"broken.json' is not valid JSON .*for one record a line, name the file "):
    open_records(str(tmp_path / "broken.json"))
  (tmp_path / "object.json").write_text('{"text": "a"}')
  with pytest.raises(ValueError, match=r"object.json' holds a JSON dict; a .json source holds a list of records"):
    open_records(str(tmp_path / "object.json"))
  with pytest.raises(ValueError, match=r"unknown extension '.csv'"):
    SourceConfig("x.csv", "captions")
  with pytest.raises(ValueError, match=r"format='caption' is not one of \('captions', 'conversations', 'text'\)"):
    SourceConfig("x.jsonl", "caption")
  with pytest.raises(ValueError, match=r"batch_size=3 does not split over 2 processes"):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    DataIterator(DataConfig([SourceConfig(path, "text")], batch_size=3), processor, process_index=0,
                 process_count=2)


def test_data_that_leaves_nothing_to_train_on_fails_instead_of_hanging(processor, tmp_path, monkeypatch):
  monkeypatch.setattr("dvl_jax.data.rows.MAX_SKIPPED_IN_A_ROW", 50)
  path = write_jsonl(tmp_path / "t.jsonl", ["{oops"] * 3)
  with DataIterator(DataConfig([SourceConfig(path, "text")], batch_size=1), processor, process_index=0,
                    process_count=1) as data:
    with pytest.raises(ValueError, match=r"The last 50 records read were all skipped.*50 x malformed JSON"):
      next(data)

