"""Batches: packed and padded rows, mixtures, modality grouping and warm-up, and exact resumption from the
iterator state (with worker processes too)."""

import json

import numpy as np
import pytest

from dvl_jax.data import DataConfig, DataIterator, SourceConfig
from dvl_jax.data.examples import make_example
from dvl_jax.data.formats import parse
from dvl_jax.data.mixture import is_text_step, text_share
from dvl_jax.data.records import open_records
from data_pipeline.conftest import write_jsonl


@pytest.fixture
def files(tmp_path, images):
  """Captions of 3 images (two with a prompt-length twist) and text of varied lengths."""
  caps = write_jsonl(tmp_path / "caps.jsonl", [{"image": name, "caption": f"Caption {i}: " + "word " * i}
                                               for i, name in enumerate(["dog_a.png", "chart.png", "monday.jpg"] * 3)])
  text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Text {i}. " + "more words here " * (3 * i)}
                                               for i in range(12)])
  return {"caps": SourceConfig(caps, "captions", images=str(images)), "text": SourceConfig(text, "text")}


def _iterate(config, processor, steps, **kw):
  with DataIterator(config, processor, process_index=0, process_count=1, **kw) as data:
    return [next(data) for _ in range(steps)]


def _expected_examples(processor, source, seq_len=512):
  records = open_records(source.path)
  return {records[i].where: make_example(parse(records[i].value, source), processor, seq_len=seq_len, max_images=3,
                                         overlong="truncate") for i in range(len(records))}


def test_packed_rows_hold_whole_samples_with_their_segments_positions_masks_and_images(processor, files):
  config = DataConfig([files["caps"]], batch_size=2, seq_len=512, packing=True, max_images=3, seed=3)
  expected = list(_expected_examples(processor, files["caps"]).values())
  for batch in _iterate(config, processor, 3):
    a = batch.arrays
    assert a["input_ids"].shape == (2, 512) and a["pixel_values"].shape == (2, 3, 32, 32, 3)
    for r in range(2):
      segments = a["attention_mask"][r]
      n = segments.max()
      assert n >= 2  # several samples a row
      assert (np.diff(segments[segments > 0]) >= 0).all() and (segments[np.argmin(segments > 0):] == 0).all()
      k = 0
      for s in range(1, n + 1):
        at = segments == s
        ids = a["input_ids"][r, at]
        match = [e for e in expected if len(e) == len(ids) and (e.ids == ids).all()]
        assert match, "a packed segment is not one whole sample"
        np.testing.assert_array_equal(a["positions"][r, at], np.arange(len(ids)))
        np.testing.assert_array_equal(a["loss_mask"][r, at], match[0].loss_mask)
        np.testing.assert_array_equal(a["pixel_values"][r, k], match[0].pixel_values[0])  # its image, in order
        k += 1
      assert (a["pixel_values"][r, k:] == 0).all()
      assert (a["input_ids"][r, segments == 0] == processor.tokenizer.pad_token_id).all()
      assert (a["loss_mask"][r, segments == 0] == 0).all()


def test_padding_mode_one_sample_a_row_in_the_smallest_bucket(processor, files):
  config = DataConfig([files["text"]], batch_size=3, seq_len=512, buckets=(64, 128, 512), shuffle=False)
  expected = _expected_examples(processor, files["text"])
  lengths = [len(e) for e in expected.values()]
  for step, batch in enumerate(_iterate(config, processor, 4)):
    a = batch.arrays
    rows = lengths[3 * step:3 * step + 3]
    assert a["input_ids"].shape[1] == min(b for b in (64, 128, 512) if b >= max(rows))
    assert "pixel_values" not in a and batch.modality == "text"
    for r, n in enumerate(rows):
      assert a["attention_mask"][r].tolist() == [1] * n + [0] * (a["input_ids"].shape[1] - n)
      np.testing.assert_array_equal(a["positions"][r, :n], np.arange(n))


def test_mixture_weights_and_modality_grouping_with_warmup(processor, files):
  caps, text = files["caps"], files["text"]
  # Without grouping: rows of both sources in one batch, in proportion to the weights.
  mixed = DataConfig([SourceConfig(caps.path, "captions", images=caps.images, weight=1.0),
                      SourceConfig(text.path, "text", weight=3.0)], batch_size=8, seq_len=512,
                     group_by_modality=False, max_images=1)
  batches = _iterate(mixed, processor, 4)
  assert {b.modality for b in batches} == {"mixed"}
  images = sum(b.images for b in batches)
  assert images == 8 and all(b.arrays["pixel_values"].shape == (8, 1, 32, 32, 3) for b in batches)
  # With grouping: each step all-text or all-multimodal; the text share starts at 1 and falls to 3/4.
  grouped = DataConfig(mixed.sources, batch_size=2, seq_len=512, text_warmup_steps=10, max_images=1, seed=5)
  batches = _iterate(grouped, processor, 14)
  for b in batches:
    has_images = b.arrays["input_ids"] == processor.tokenizer.image_token_id
    assert b.modality in ("text", "multimodal")
    assert has_images.any(axis=1).all() if b.modality == "multimodal" else not has_images.any()
  expected = ["text" if is_text_step(s, 5, 0.75, 10) else "multimodal" for s in range(14)]
  assert [b.modality for b in batches] == expected and "multimodal" in expected
  assert text_share(0, 0.75, 10) == 1.0 and text_share(5, 0.75, 10) == 0.875 and text_share(10, 0.75, 10) == 0.75
  draws = [is_text_step(s, 0, 0.3, 0) for s in range(4000)]
  assert abs(np.mean(draws) - 0.3) < 0.03
  assert np.mean([is_text_step(s, 0, 0.3, 4000) for s in range(400)]) > 0.9  # early in a long warm-up


def test_seeds(processor, files):
  config = DataConfig([files["text"]], batch_size=2, seq_len=512, seed=1)
  first, again = (_iterate(config, processor, 2) for _ in range(2))
  other = _iterate(DataConfig([files["text"]], batch_size=2, seq_len=512, seed=2), processor, 2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.arrays["input_ids"], b.arrays["input_ids"])
  assert any(a.arrays["input_ids"].shape != c.arrays["input_ids"].shape or
             (a.arrays["input_ids"] != c.arrays["input_ids"]).any() for a, c in zip(first, other))


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for a, b in zip(batches, others):
    assert a.modality == b.modality and sorted(a.arrays) == sorted(b.arrays)
    for k in a.arrays:
      np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert [s.where for s in a.skipped] == [s.where for s in b.skipped]


def _resumes_exactly(config, processor, tmp_path, at, total):
  """Batches after a restore from the state at step `at` (saved as JSON, into a new iterator) equal those of an
  uninterrupted run; so do the skip counts and the skipped.jsonl."""
  with DataIterator(config, processor, process_index=0, process_count=1, run_dir=str(tmp_path / "a"),
                    log=lambda _: None) as data:
    straight = [next(data) for _ in range(total)]
    counts = data.report.state()
  with DataIterator(config, processor, process_index=0, process_count=1, run_dir=str(tmp_path / "c"),
                    log=lambda _: None) as data:
    [next(data) for _ in range(at)]
    state = json.dumps(data.get_state())
    [next(data) for _ in range(2)]  # the run goes on past its checkpoint, then is killed
  with DataIterator(config, processor, process_index=0, process_count=1, run_dir=str(tmp_path / "c"),
                    log=lambda _: None) as data:
    data.set_state(json.loads(state))
    resumed = [next(data) for _ in range(total - at)]
    assert data.report.state() == counts
  _assert_same(straight[at:], resumed)
  ledger = [p / "skipped.jsonl" for p in (tmp_path / "a", tmp_path / "c")]
  assert [p.read_text() if p.exists() else None for p in ledger] == [ledger[0].read_text() if ledger[0].exists()
                                                                     else None] * 2
  return json.loads(state)


def test_a_state_from_another_process_or_worker_count_is_refused_by_name(processor, files):
  config = DataConfig([files["text"]], batch_size=2, seq_len=512)
  with DataIterator(config, processor, process_index=0, process_count=1) as data:
    next(data)
    state = data.get_state()
  with DataIterator(config, processor, process_index=0, process_count=2) as data:
    with pytest.raises(ValueError, match=r"saved by 1 process\(es\) with workers=0 each; this run has 2 with "
                                         r"workers=0\. .*resume with the same process count and data.workers"):
      data.set_state(state)


def test_resume_from_the_iterator_state_mid_round_is_exact(processor, files, tmp_path):
  bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', "{broken", '{"text": "also fine"}'])
  config = DataConfig([files["caps"], files["text"], SourceConfig(bad, "text")], batch_size=2, seq_len=512,
                      packing=True, max_images=2, text_warmup_steps=4, seed=7, pack_bins=3)
  (tmp_path / "a").mkdir(), (tmp_path / "c").mkdir()
  state = _resumes_exactly(config, processor, tmp_path, at=5, total=9)["pipeline"]
  assert state["text"]["emitted"] and state["multimodal"]["emitted"]  # restored in the middle of packing rounds


@pytest.mark.slow
def test_resume_with_worker_processes_is_exact_and_equals_no_workers(processor, files, tmp_path):
  config = DataConfig([files["caps"]], batch_size=2, seq_len=512, packing=True, max_images=2, workers=1, seed=4)
  (tmp_path / "a").mkdir(), (tmp_path / "c").mkdir()
  _resumes_exactly(config, processor, tmp_path, at=2, total=5)
  no_workers = DataConfig([files["caps"]], batch_size=2, seq_len=512, packing=True, max_images=2, seed=4)
  _assert_same(_iterate(config, processor, 3), _iterate(no_workers, processor, 3))


def test_the_hybrid_models_batches_carry_the_high_resolution_images(tmp_path, images):
  from dvl_jax.processing import Processor
  from dvl_jax.processing.images import preprocess
  from reference import hf_processor

  hf_processor(str(tmp_path / "proc"), hybrid=True, num_image_tokens=16, size=32, high_res_size=64)
  processor = Processor.from_pretrained(tmp_path / "proc")
  caps = write_jsonl(tmp_path / "caps.jsonl", [{"image": "chart.png", "caption": "A chart."}])
  config = DataConfig([SourceConfig(caps, "captions", images=str(images))], batch_size=2, seq_len=512,
                      packing=True, max_images=2)
  (batch,) = _iterate(config, processor, 1)
  expected = preprocess(str(images / "chart.png"), processor.image_config)
  assert batch.arrays["high_res_pixel_values"].shape == (2, 2, 64, 64, 3)
  np.testing.assert_array_equal(batch.arrays["high_res_pixel_values"][0, 0], expected["high_res_pixel_values"])
  np.testing.assert_array_equal(batch.arrays["pixel_values"][0, 1], expected["pixel_values"])


def test_orbax_saves_the_iterator_with_grains_handler_a_file_per_process(processor, files, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  config = DataConfig([files["caps"], files["text"]], batch_size=2, seq_len=512, packing=True, max_images=2)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  with DataIterator(config, processor, process_index=0, process_count=1) as data:
    [next(data) for _ in range(3)]
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(data)))
    manager.wait_until_finished()
    expected = [next(data) for _ in range(3)]
  assert (tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").exists()
  with DataIterator(config, processor, process_index=0, process_count=1) as data:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data)))
    assert data.step == 3
    _assert_same(expected, [next(data) for _ in range(3)])
  manager.close()
