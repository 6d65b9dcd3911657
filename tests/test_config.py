"""Configs: presets' parameter counts against transformers, and parsing of both config.json layouts."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import torch
from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

import dvl_jax
from dvl_jax.config import num_params
from dvl_jax.convert.hf_config import from_hf_config
from dvl_jax.nn.llama import LlamaDecoder
from reference import hf_config

SIGLIP_L = dict(model_type="siglip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                vision_use_head=False)
LLAMA_1_3B = dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-6,
                  max_position_embeddings=16384, tie_word_embeddings=False)
LLAMA_7B = dict(LLAMA_1_3B, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                num_key_value_heads=32)


def _count_torch(model: torch.nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def test_1_3b_preset_param_count_equals_transformers():
  hf_cfg = DeepseekVLConfig(text_config=LLAMA_1_3B, vision_config=SIGLIP_L, tie_word_embeddings=False)
  with torch.device("meta"):
    ref = DeepseekVLForConditionalGeneration(hf_cfg)
  ours = num_params(dvl_jax.abstract_params(dvl_jax.deepseek_vl_1_3b()))
  assert ours == _count_torch(ref) == 1_962_640_384
  # The released file holds 1,975,235,584 params: ours plus the unused SigLIP attention-pool head
  # (latent 1024, q/kv/proj/norm/mlp of the MAP head), which the converter skips by name.
  head = 1024 + (1024 * 1024 + 1024) + (2048 * 1024 + 2048) + (1024 * 1024 + 1024) + 2 * 1024 + (
      4096 * 1024 + 4096) + (1024 * 4096 + 1024)
  assert ours + head == 1_975_235_584
  # The preset is the config the -hf checkpoint's config.json describes.
  assert from_hf_config(hf_cfg.to_dict()) == dvl_jax.deepseek_vl_1_3b()


SAM_B = dict(model_type="sam_vision_model", hidden_size=768, output_channels=256, num_hidden_layers=12,
             num_attention_heads=12, image_size=1024, patch_size=16, window_size=14,
             global_attn_indexes=[2, 5, 8, 11], layer_norm_eps=1e-6)


def test_7b_preset_param_count_equals_transformers():
  from transformers import DeepseekVLHybridConfig, DeepseekVLHybridForConditionalGeneration

  hf_cfg = DeepseekVLHybridConfig(text_config=LLAMA_7B, vision_config=SIGLIP_L, high_res_vision_config=SAM_B,
                                  tie_word_embeddings=False)
  with torch.device("meta"):
    ref = DeepseekVLHybridForConditionalGeneration(hf_cfg)
  ours = num_params(dvl_jax.abstract_params(dvl_jax.deepseek_vl_7b()))
  assert ours == _count_torch(ref) == 7_331_390_721
  # The released shards hold 7,343,990,017: ours plus the unused SigLIP attention-pool head (12,595,200) and
  # the hybrid tower's two unused 1024-wide layer norms (4,096).
  assert ours + 12_595_200 + 4_096 == 7_343_990_017
  assert from_hf_config(hf_cfg.to_dict()) == dvl_jax.deepseek_vl_7b()


def test_original_hybrid_config_is_the_7b_preset():
  clip = dict(pixel_mean=[0.48145466, 0.4578275, 0.40821073], pixel_std=[0.26862954, 0.26130258, 0.27577711])
  raw = {
      "model_type": "multi_modality",
      "language_config": {"num_hidden_layers": 30, "vocab_size": 102400, "max_position_embeddings": 16384},
      "vision_config": {"cls": "HybridVisionTower", "params": {
          "concat_type": "tuple", "freeze_high": True, "freeze_low": True,
          "high_res_cfg": {"model_name": "sam_b_downsample", "image_size": 1024, "output_dim": 1024,
                           "select_feature": "same", "select_layer": -1, "ckpt_path": "", **clip},
          "low_res_cfg": {"model_name": "siglip_large_patch16_384", "image_size": 384, "output_dim": 1024,
                          "pixel_mean": [0.5] * 3, "pixel_std": [0.5] * 3, "select_feature": "same",
                          "select_layer": -1, "ckpt_path": ""}}},
      "aligner_config": {"cls": "MlpProjector", "params": {
          "projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2, "input_dim": 1024, "n_embed": 4096}},
  }
  assert from_hf_config(raw) == dvl_jax.deepseek_vl_7b()


def test_7b_preset_decoder_param_count_equals_transformers():
  cfg = dvl_jax.deepseek_vl_7b()
  with torch.device("meta"):
    ref = LlamaForCausalLM(HFLlamaConfig(**{k: v for k, v in LLAMA_7B.items() if k != "model_type"}))
  ids = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: LlamaDecoder(cfg.text).init(
      jax.random.key(0), ids, ids, ids + 1, method=lambda m, i, p, a: m(m.embed(i), p, a))["params"])
  assert num_params(nn.meta.unbox(abstract)) == _count_torch(ref)
  assert cfg.is_hybrid and cfg.high_res.global_attn_indexes == (2, 5, 8, 11)


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda: dvl_jax.model.DeepseekVL(dvl_jax.tiny()).init(
      jax.random.key(0), *dvl_jax.model._dummy_inputs(dvl_jax.tiny()))["params"])
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named)), f"{jax.tree_util.keystr(path)} repeats a logical axis: {leaf.names}"
  q = boxed["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("heads", "head_dim", "embed")
  assert boxed["vision_model"]["layers"]["mlp"]["fc1"]["kernel"].names[0] == "layers"  # SigLIP stays scanned


def test_hf_config_round_trip():
  cfg = from_hf_config(hf_config("gqa").to_dict())
  assert cfg.text.num_heads == 4 and cfg.text.num_kv_heads == 2 and cfg.text.head_dim == 8
  assert cfg.vision.num_patches == 16 and cfg.tokens_per_image == 16
  assert cfg.image_token_id == 5
  assert dvl_jax.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  hash(cfg)  # usable as a static jit argument


def test_original_config_fills_llama_defaults_and_truncates_by_select_layer():
  raw = {
      "model_type": "multi_modality",
      "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "vocab_size": 102400, "max_position_embeddings": 16384},
      "vision_config": {"cls": "CLIPVisionTower", "params": {"model_name": "siglip_large_patch16_384",
                                                             "image_size": 384, "select_layer": -1}},
      "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", "depth": 2,
                                                           "input_dim": 1024, "n_embed": 2048}},
  }
  assert from_hf_config(raw) == dvl_jax.deepseek_vl_1_3b()
  raw["vision_config"]["params"]["select_layer"] = -2
  assert from_hf_config(raw).vision.num_layers == 23


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llava"), r"Unknown model_type 'llava'"),
    (lambda c: c.update(model_type="deepseek_vl_hybrid"), r"needs a 'high_res_vision_config' object"),
    (lambda c: c["vision_config"].update(hidden_act="gelu_pytorch_tanh"), r"exact GELU"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "linear", "factor": 2.0}), r"RoPE scaling"),
    (lambda c: c["text_config"].update(num_key_value_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    (lambda c: c.pop("text_config"), r"needs a 'text_config' object"),
])
def test_config_errors(edit, match):
  raw = hf_config("gqa").to_dict()
  edit(raw)
  with pytest.raises(ValueError, match=match):
    from_hf_config(raw)


def test_preset_lookup():
  assert dvl_jax.preset("tiny") == dvl_jax.tiny()
  with pytest.raises(ValueError, match="known presets"):
    dvl_jax.preset("deepseek-vl-2b")


def test_attention_field_round_trips_and_older_files_without_it_load():
  cfg = dvl_jax.tiny_hybrid().with_attention("xla")
  assert {cfg.text.attention, cfg.vision.attention, cfg.high_res.attention} == {"xla"}
  assert dvl_jax.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  old = cfg.to_dict()  # a dvl_config.json written before the field existed
  for tower in ("text", "vision", "high_res"):
    del old[tower]["attention"]
  assert dvl_jax.ModelConfig.from_dict(old) == dvl_jax.tiny_hybrid()  # "auto" everywhere


@pytest.mark.parametrize("make", [lambda: dvl_jax.LlamaConfig(attention="flash"),
                                  lambda: dvl_jax.SiglipConfig(attention="flash"),
                                  lambda: dvl_jax.tiny_hybrid().with_attention("flash")])
def test_unknown_attention_names_the_valid_ones(make):
  with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'cpu', 'xla', 'splash'\), got 'flash'"):
    make()
