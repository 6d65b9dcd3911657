"""dvl_jax.load and the model call: errors that name the problem."""

import jax
import numpy as np
import pytest

import dvl_jax
from dvl_jax import checkpoint
from dvl_jax.convert import convert_checkpoint
from reference import hf_logits, hf_model, max_rel_err, random_inputs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  ref = hf_model("gqa")
  src = tmp_path_factory.mktemp("hf")
  ref.save_pretrained(src)
  dst = tmp_path_factory.mktemp("dvl") / "ckpt"
  convert_checkpoint(src, dst, log=lambda *_: None)
  return ref, src, dst


def test_load_explains_what_is_not_a_checkpoint(tmp_path, converted):
  _, src, _ = converted
  with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
    dvl_jax.load(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=r"no dvl_config.json.*convert it first with `python convert/"):
    dvl_jax.load(src)


def test_load_of_a_hub_id_says_how_to_download_and_convert(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # so that no local folder of that name exists
  with pytest.raises(FileNotFoundError, match=r"(?s)No checkpoint directory at 'deepseek-community/deepseek-vl-1.3b-chat'"
                     r".*does not download from the Hub.*`hf download deepseek-community/deepseek-vl-1.3b-chat "
                     r"--local-dir DIR`.*`python convert/torch_to_orbax.py --src DIR --dst CKPT`"):
    dvl_jax.load("deepseek-community/deepseek-vl-1.3b-chat")
  (tmp_path / "owner").mkdir()
  (tmp_path / "owner" / "name").write_text("a file, not a checkpoint")  # exists: a local path, not a Hub id
  with pytest.raises(FileNotFoundError, match="No checkpoint directory") as err:
    dvl_jax.load("owner/name")
  assert "Hub" not in str(err.value)
  with pytest.raises(FileNotFoundError, match="does not download from the Hub"):
    dvl_jax.Model.from_pretrained("deepseek-community/deepseek-vl-1.3b-chat")


def test_from_pretrained_is_load(converted):
  ref, _, dst = converted
  model = dvl_jax.Model.from_pretrained(dst, dtype="bfloat16")
  assert model.config.dtype == "bfloat16"
  ids, mask, pixels = random_inputs(ref, [1])
  assert max_rel_err(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).astype(np.float32),
                     hf_logits(ref, ids, mask, pixels, [1]), mask) < 5e-2  # bfloat16


def test_generation_output_rows_are_cut_at_their_lengths():
  tokens = np.array([[11, 12, 13, 0, 0], [21, 0, 0, 0, 0], [31, 32, 33, 34, 35]], np.int32)  # pad id 0
  out = dvl_jax.GenerationOutput(tokens=tokens, lengths=np.array([3, 1, 5], np.int32))
  assert len(out) == 3 and out.sequences is out.tokens
  rows = [tokens[i, :n] for i, n in enumerate(out.lengths)]
  for got, want in zip(out, rows, strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(out[np.int64(2)], rows[2])
  np.testing.assert_array_equal(out[-2], rows[1])
  for key in ("sequences", slice(0, 2), (0, 1)):
    with pytest.raises(TypeError, match=r"index it by row, out\[i\].*out.tokens.*processor.batch_decode\(out\)"):
      out[key]  # pylint: disable=pointless-statement


def test_load_refuses_params_that_disagree_with_the_config(tmp_path, converted):
  ref, _, dst = converted
  small = dvl_jax.load(dst).config
  other = tmp_path / "other"
  checkpoint.save(other, dvl_jax.init_params(small.replace(text=dvl_jax.LlamaConfig(
      **{**small.text.__dict__, "mlp_dim": 96}))), small)
  with pytest.raises(ValueError, match=r"(?s)do not match dvl_config.json:\n.*mlp.*stored .*96.*re-convert"):
    dvl_jax.load(other)


def test_load_explains_a_checkpoint_with_stacked_decoder_layers(tmp_path, converted):
  # dvl_jax wrote the decoder's layers stacked ([L, ...] under nn.scan) before they were unrolled.
  _, _, dst = converted
  config = dvl_jax.load(dst).config
  params = jax.tree.map(np.asarray, dvl_jax.init_params(config))
  text = params["language_model"]
  layers = [text.pop(f"layers_{i}") for i in range(config.text.num_layers)]
  text["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  old = tmp_path / "old"
  checkpoint.save(old, params, config)
  with pytest.raises(ValueError, match=r"(?s)\['language_model'\]\['layers_0'\].*stack the decoder's layers.*"
                                       r"re-convert the source checkpoint"):
    dvl_jax.load(old)


def test_model_input_errors(converted):
  ref, _, dst = converted
  model = dvl_jax.load(dst)
  ids, mask, pixels = random_inputs(ref, [2, 1])
  with pytest.raises(ValueError, match=r"Row 0 of input_ids has 32 image tokens.*1 image slot\(s\) per row"):
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, :1])
  with pytest.raises(ValueError, match=r"has 32 image tokens .* 0 image slot"):
    model(input_ids=ids, attention_mask=mask)
  cut = ids.copy()
  cut[0, np.flatnonzero(cut[0] == 5)[0]] = 7  # one image token too few
  with pytest.raises(ValueError, match=r"Row 0 of input_ids has 31 image tokens.*multiple of 16"):
    model(input_ids=cut, attention_mask=mask, pixel_values=pixels)
  with pytest.raises(ValueError, match=r"channels-last"):
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels.transpose(0, 1, 4, 2, 3))
  with pytest.raises(ValueError, match=r"attention_mask shape"):
    model(input_ids=ids, attention_mask=mask[:, 1:], pixel_values=pixels)
  with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 128\)"):
    model(input_ids=ids + 1000, attention_mask=mask)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\]"):
    model(input_ids=ids[0])


def test_forward_with_cache_prefills_images_then_decodes_like_transformers(converted):
  ref, _, dst = converted
  model = dvl_jax.load(dst)
  ids, mask, pixels = random_inputs(ref, [2, 1], pad=[0, 4])
  expected = hf_logits(ref, ids, mask, pixels, [2, 1])
  prompt = ids.shape[1] - 3
  cache = model.init_cache(batch_size=2, max_len=ids.shape[1] + 5)
  out = model.forward(ids[:, :prompt], mask[:, :prompt], pixels, cache=cache)
  steps = [out.logits]
  for t in range(prompt, ids.shape[1]):  # one token at a time; positions continue from the cache
    out = model.forward(ids[:, t:t + 1], mask[:, t:t + 1], cache=out.cache)
    steps.append(out.logits)
  assert max_rel_err(np.concatenate(steps, axis=1), expected, mask) < 1e-4
  assert int(out.cache.end) == ids.shape[1]


def _zeros(config):
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dvl_jax.abstract_params(config))


def test_hybrid_model_input_errors():
  from dvl_jax.convert.hf_config import from_hf_config
  from reference import hf_hybrid_config, hf_hybrid_model

  config = from_hf_config(hf_hybrid_config().to_dict())
  model = dvl_jax.Model(config, _zeros(config))  # input checks need no weights (random init compiles for a minute)
  ids, mask, pixels, high = random_inputs(hf_hybrid_model(), [1, 0])
  assert model(input_ids=ids, attention_mask=mask, pixel_values=pixels, high_res_pixel_values=high).shape[:2] == ids.shape
  with pytest.raises(ValueError, match=r"takes high_res_pixel_values \[2, 1, 64, 64, 3\] beside pixel_values.*got none"):
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
  with pytest.raises(ValueError, match=r"got shape \(2, 1, 32, 32, 3\)"):
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, high_res_pixel_values=pixels)
  plain = dvl_jax.Model(dvl_jax.tiny(), _zeros(dvl_jax.tiny()))
  with pytest.raises(ValueError, match="has no high-resolution"):
    plain(input_ids=np.zeros((1, 3), np.int32), high_res_pixel_values=high)
