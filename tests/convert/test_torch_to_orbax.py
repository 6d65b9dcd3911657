"""End to end: tiny random transformers DeepSeek-VL checkpoints -> convert -> dvl_jax.load -> same logits."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dvl_jax
from dvl_jax.convert import convert_checkpoint
from reference import (TINY_HYBRID, hf_hybrid_model, hf_logits, hf_model, max_rel_err, random_inputs,
                       to_torch_images, tokens_per_image, write_original_layout)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-4  # max abs error relative to the max abs logit, float32
IMAGES_PER_ROW = [2, 1]  # a batch of 2 with two images in the first row


def _convert(tmp_path_factory, model, name, **kwargs):
  src = tmp_path_factory.mktemp(f"{name}_hf")
  model.save_pretrained(src, **kwargs)
  dst = tmp_path_factory.mktemp(f"{name}_dvl") / "ckpt"
  convert_checkpoint(src, dst, log=lambda *_: None)
  return src, dst


def _assert_matches_reference(ref_model, ours, images_per_row=IMAGES_PER_ROW, pad=(0, 3)):
  ids, mask, pixels = random_inputs(ref_model, images_per_row, pad=list(pad))
  expected = hf_logits(ref_model, ids, mask, pixels, images_per_row)
  logits = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)
  assert logits.shape == expected.shape
  assert max_rel_err(logits, expected, mask) < TOL
  # Text only (no pixel_values, no image tokens).
  ids, mask, _ = random_inputs(ref_model, [0, 0], pad=list(pad), seed=1)
  assert max_rel_err(ours(input_ids=ids, attention_mask=mask), hf_logits(ref_model, ids, mask), mask) < TOL


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa_deep"])
def test_hf_layout_matches_transformers(tmp_path_factory, name):
  ref = hf_model(name)
  _, dst = _convert(tmp_path_factory, ref, name)
  ours = dvl_jax.load(dst)
  assert ours.config.text.num_kv_heads == ref.config.text_config.num_key_value_heads
  _assert_matches_reference(ref, ours)


def test_image_features_match_before_the_decoder(tmp_path_factory):
  ref = hf_model("gqa")
  _, dst = _convert(tmp_path_factory, ref, "features")
  ours = dvl_jax.load(dst)
  _, _, pixels = random_inputs(ref, [2])
  feats = ours.module.apply({"params": ours.params}, jnp.asarray(pixels), method="encode_images")
  with torch.no_grad():
    expected = ref.model.get_image_features(torch.tensor(pixels[0]).permute(0, 3, 1, 2)).pooler_output.numpy()
  assert feats.shape == (1, 2 * tokens_per_image(ref), ref.config.text_config.hidden_size)
  assert max_rel_err(feats[0], expected.reshape(feats.shape[1:])) < TOL


def test_original_deepseek_layout_matches_transformers(tmp_path_factory):
  ref = hf_model("gqa", seed=3)
  src, _ = _convert(tmp_path_factory, ref, "orig_base")
  orig = tmp_path_factory.mktemp("original")
  write_original_layout(src, orig)
  keys = load_file(os.path.join(orig, "model.safetensors")).keys()
  assert any(".attn.qkv." in k for k in keys) and "vision_model.vision_tower.pos_embed" in keys
  dst = tmp_path_factory.mktemp("orig_dvl") / "ckpt"
  messages = []
  convert_checkpoint(orig, dst, log=messages.append)
  assert "original layout" in messages[0] and "2 unused skipped" in messages[0]  # the attn_pool tensors
  _assert_matches_reference(ref, dvl_jax.load(dst))


def test_bfloat16_checkpoint_converts_and_loads(tmp_path_factory):
  ref = hf_model("gqa", seed=5).to(torch.bfloat16)
  _, dst = _convert(tmp_path_factory, ref, "bf16")
  ours_bf16 = dvl_jax.load(dst)
  assert ours_bf16.config.param_dtype == "bfloat16"
  assert {x.dtype for x in __import__("jax").tree.leaves(ours_bf16.params)} == {jnp.dtype("bfloat16")}
  # The same bfloat16 weights, computed in float32 on both sides, agree to float32 precision.
  ours = dvl_jax.load(dst, dtype="float32")
  _assert_matches_reference(ref.float(), ours)
  # Computing in bfloat16 stays close.
  ids, mask, pixels = random_inputs(ref, IMAGES_PER_ROW)
  low = ours_bf16(input_ids=ids, attention_mask=mask, pixel_values=pixels)
  assert low.dtype == jnp.bfloat16
  assert max_rel_err(low, ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)) < 5e-2


def test_float32_source_converts_to_bfloat16_on_request(tmp_path):
  ref = hf_model("mha")
  ref.save_pretrained(tmp_path / "hf")
  convert_checkpoint(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", log=lambda *_: None)
  ours = dvl_jax.load(tmp_path / "out", dtype="float32")
  expected = ref.model.language_model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(ours.params["language_model"]["embed_tokens"]["embedding"], expected)


def test_sharded_checkpoint_with_index(tmp_path_factory):
  ref = hf_model("mha", seed=7)
  src, dst = _convert(tmp_path_factory, ref, "sharded", max_shard_size="40KB")
  assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
  assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) > 1
  _assert_matches_reference(ref, dvl_jax.load(dst))


def test_tied_embeddings_fill_lm_head(tmp_path_factory):
  ref = hf_model("mha", seed=9, tie_word_embeddings=True)
  src, dst = _convert(tmp_path_factory, ref, "tied")
  assert "lm_head.weight" not in load_file(os.path.join(src, "model.safetensors"))
  _assert_matches_reference(ref, dvl_jax.load(dst))


def test_destination_holds_config_and_source_files(tmp_path_factory):
  ref = hf_model("mha")
  src, dst = _convert(tmp_path_factory, ref, "files")
  names = set(os.listdir(dst))
  assert {"params", "dvl_config.json", "config.json", "generation_config.json"} <= names
  assert not any(n.endswith(".safetensors") for n in names)


def test_cli_converts_and_reports_errors(tmp_path):
  ref = hf_model("mha")
  ref.save_pretrained(tmp_path / "hf")
  script = os.path.join(ROOT, "convert", "torch_to_orbax.py")
  ok = subprocess.run([sys.executable, script, "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "out")],
                      capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert "Converted" in ok.stdout
  again = subprocess.run([sys.executable, script, "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "out")],
                         capture_output=True, text=True)
  assert again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr


# ----- the hybrid (SAM + SigLIP) model -----

def _assert_hybrid_matches_reference(ref_model, ours):
  ids, mask, pixels, high = random_inputs(ref_model, IMAGES_PER_ROW, pad=[0, 3])
  expected = hf_logits(ref_model, ids, mask, pixels, IMAGES_PER_ROW, high_res_pixel_values=high)
  logits = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, high_res_pixel_values=high)
  assert max_rel_err(logits, expected, mask) < TOL


@pytest.mark.parametrize("name", list(TINY_HYBRID))
def test_hybrid_hf_and_original_layouts_match_transformers(tmp_path_factory, name):
  """Windows that divide the SAM grid and that need padding, one to three global blocks, a non-zero alpha."""
  ref = hf_hybrid_model(name)
  src, dst = _convert(tmp_path_factory, ref, f"hybrid_{name}")
  ours = dvl_jax.load(dst)
  assert ours.config.is_hybrid
  assert list(ours.config.high_res.global_attn_indexes) == ref.config.high_res_vision_config.global_attn_indexes
  alpha = ref.model.high_res_vision_alpha.item()
  assert alpha != 0 and float(ours.params["high_res_vision_model"]["alpha"][0]) == pytest.approx(alpha, abs=1e-7)
  _assert_hybrid_matches_reference(ref, ours)

  orig = tmp_path_factory.mktemp(f"hybrid_{name}_original")
  write_original_layout(src, orig)
  assert any("neck_hd" in k for k in load_file(os.path.join(orig, "model.safetensors")))
  dst2 = tmp_path_factory.mktemp(f"hybrid_{name}_dvl2") / "ckpt"
  messages = []
  convert_checkpoint(orig, dst2, log=messages.append)
  assert "original layout" in messages[0] and "4 unused skipped" in messages[0]  # attn_pool x2, layer norms x2
  _assert_hybrid_matches_reference(ref, dvl_jax.load(dst2))


def test_hybrid_high_res_features_match_before_the_aligner(tmp_path_factory):
  ref = hf_hybrid_model("three_globals", seed=2)
  _, dst = _convert(tmp_path_factory, ref, "hybrid_features")
  ours = dvl_jax.load(dst)
  _, _, _, high = random_inputs(ref, [2])
  feats = ours.module.apply({"params": ours.params}, jnp.asarray(high[0]),
                            method=lambda m, x: m.high_res_vision_model(x))
  with torch.no_grad():
    expected = ref.model.get_high_res_image_features(to_torch_images(high, [2])).last_hidden_state.numpy()
  assert feats.shape == expected.shape == (2, 16, 24)
  assert max_rel_err(feats, expected) < TOL


# ----- errors -----

def _hf_dir(tmp_path, **top):
  src = tmp_path / "hf"
  hf_model("gqa", **top).save_pretrained(src)
  return src


def test_error_source_without_weights(tmp_path):
  src = _hf_dir(tmp_path)
  os.remove(src / "model.safetensors")
  (src / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"No safetensors weights .*pytorch_model.bin.*safe_serialization"):
    convert_checkpoint(src, tmp_path / "out")


def test_error_missing_source_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert_checkpoint(tmp_path / "nope", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    convert_checkpoint(tmp_path / "empty", tmp_path / "out")


def _edit_config(src, edit):
  path = src / "config.json"
  cfg = json.loads(path.read_text())
  edit(cfg)
  path.write_text(json.dumps(cfg))


def test_error_config_shapes_disagree_with_weights(tmp_path):
  src = _hf_dir(tmp_path)
  _edit_config(src, lambda c: c["text_config"].update(intermediate_size=96))
  with pytest.raises(ValueError, match=r"shape mismatches:\n.*mlp\.(gate|up|down)_proj\.weight: shape \(.*\) does "
                     r"not fit the model config, which expects"):
    convert_checkpoint(src, tmp_path / "out")


def test_error_config_has_fewer_layers_than_weights(tmp_path):
  src = _hf_dir(tmp_path)
  _edit_config(src, lambda c: c["vision_config"].update(num_hidden_layers=1))
  with pytest.raises(ValueError, match=r"unexpected tensors:\n.*encoder\.layers\.1\..*\(layer 1, but the config "
                     r"has 1 layers\)"):
    convert_checkpoint(src, tmp_path / "out")


def test_error_config_has_fewer_decoder_layers_than_weights(tmp_path):
  src = _hf_dir(tmp_path)
  _edit_config(src, lambda c: c["text_config"].update(num_hidden_layers=1))
  with pytest.raises(ValueError, match=r"unexpected tensors:\n.*language_model\.layers\.1\."):
    convert_checkpoint(src, tmp_path / "out")


def test_error_lists_missing_and_unexpected_keys(tmp_path):
  src = _hf_dir(tmp_path)
  sd = load_file(src / "model.safetensors")
  sd["model.aligner.extra.weight"] = sd.pop("model.aligner.linear2.weight")
  save_file(sd, src / "model.safetensors")
  with pytest.raises(ValueError) as err:
    convert_checkpoint(src, tmp_path / "out")
  msg = str(err.value)
  assert "params not found in the checkpoint:\n    aligner/linear2/kernel (32, 32)" in msg
  assert "unexpected tensors:\n    model.aligner.extra.weight (32, 32)" in msg


def test_error_unknown_model_type(tmp_path):
  src = _hf_dir(tmp_path)
  _edit_config(src, lambda c: c.update(model_type="llava"))
  with pytest.raises(ValueError, match=r"Unknown model_type 'llava'.*deepseek_vl"):
    convert_checkpoint(src, tmp_path / "out")


def test_error_unrecognised_key_layout(tmp_path):
  src = _hf_dir(tmp_path)
  save_file({"encoder.weight": torch.zeros(2)}, src / "model.safetensors")
  with pytest.raises(ValueError, match=r"Unrecognised checkpoint key layout.*encoder.weight"):
    convert_checkpoint(src, tmp_path / "out")


def test_error_corrupt_safetensors(tmp_path):
  src = _hf_dir(tmp_path)
  (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    convert_checkpoint(src, tmp_path / "out")
