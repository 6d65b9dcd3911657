"""A PyTorch checkpoint's `config.json` -> our ModelConfig (the converter's input; our own format, dvl_config.json,
is `ModelConfig.to_dict`/`from_dict` in dvl_jax/config.py).

Two `config.json` layouts are read:
- `-hf` (transformers' `DeepseekVLConfig`, `DeepseekVLHybridConfig`): `{"model_type": "deepseek_vl",
  "text_config": {...llama}, "vision_config": {...siglip_vision_model}, "image_token_id": ...}`, the hybrid with
  a `high_res_vision_config` ({...sam_vision_model});
- original `deepseek-ai/*` (`MultiModalityConfig`): `{"model_type": "multi_modality", "language_config":
  {...LlamaConfig kwargs}, "vision_config": {"cls": "CLIPVisionTower", "params": {"model_name": ...}},
  "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", ...}}}`.
"""

from __future__ import annotations

import json
from typing import Any

from dvl_jax.config import AlignerConfig, LlamaConfig, ModelConfig, SamConfig, SiglipConfig

# Ref: deepseek_vl/models/siglip_vit.py SigLIP_MODEL_CONFIG (the original names a timm variant).
_SIGLIP_VARIANTS = {
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
}
HF_MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")
ORIGINAL_MODEL_TYPES = ("multi_modality",)


def _rope_theta(text: dict[str, Any]) -> float:
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"RoPE scaling {kind!r} is not supported (DeepSeek-VL uses plain RoPE); got {rope}.")
  return float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))


def _llama_from_dict(text: dict[str, Any]) -> LlamaConfig:
  """A transformers `LlamaConfig` dict; missing keys take LlamaConfig's defaults, as the original does."""
  if text.get("hidden_act", "silu") != "silu":
    raise ValueError(f"Only a SiLU (SwiGLU) LLaMA MLP is supported, got hidden_act={text['hidden_act']!r}.")
  if text.get("attention_bias") or text.get("mlp_bias"):
    raise ValueError("LLaMA attention/MLP biases are not supported (DeepSeek-VL has none).")
  hidden = text.get("hidden_size", 4096)
  heads = text.get("num_attention_heads", 32)
  return LlamaConfig(
      vocab_size=text.get("vocab_size", 32000),
      embed_dim=hidden,
      mlp_dim=text.get("intermediate_size", 11008),
      num_layers=text.get("num_hidden_layers", 32),
      num_heads=heads,
      num_kv_heads=text.get("num_key_value_heads") or heads,
      head_dim=text.get("head_dim") or hidden // heads,
      rope_theta=_rope_theta(text),
      norm_eps=text.get("rms_norm_eps", 1e-6),
      max_position_embeddings=text.get("max_position_embeddings", 2048),
  )


def _siglip_from_hf(vision: dict[str, Any]) -> SiglipConfig:
  act = vision.get("hidden_act", "gelu_pytorch_tanh")
  if act != "gelu":
    raise ValueError(f"DeepSeek-VL's SigLIP uses the exact GELU (hidden_act='gelu'); this config has {act!r}.")
  return SiglipConfig(
      image_size=vision.get("image_size", 224),
      patch_size=vision.get("patch_size", 16),
      embed_dim=vision.get("hidden_size", 768),
      mlp_dim=vision.get("intermediate_size", 3072),
      num_layers=vision.get("num_hidden_layers", 12),
      num_heads=vision.get("num_attention_heads", 12),
      norm_eps=vision.get("layer_norm_eps", 1e-6),
  )


def _siglip_from_original(params: dict[str, Any]) -> SiglipConfig:
  """`vision_config.params` of the original CLIPVisionTower.

  The variant named by `model_name` gives the dimensions; the keys `patch_size`, `width`, `layers`, `heads`
  and `mlp_ratio` override them when present (a dvl_jax extension that lets tests write tiny checkpoints in
  the original layout; the released configs carry none of them).
  """
  name = params.get("model_name", "")
  if name not in _SIGLIP_VARIANTS:
    raise ValueError(f"Unsupported vision tower model_name {name!r}; expected one of {sorted(_SIGLIP_VARIANTS)}.")
  v = {**_SIGLIP_VARIANTS[name], **{k: params[k] for k in _SIGLIP_VARIANTS[name] if k in params}}
  # Ref: siglip_vit.py create_siglip_vit: truncation by select_layer builds fewer blocks.
  select = params.get("select_layer", -1)
  layers = min(v["layers"], v["layers"] + select + 1) if select <= 0 else min(v["layers"], select)
  if layers <= 0:
    raise ValueError(f"select_layer={select} leaves no SigLIP block of {v['layers']}.")
  return SiglipConfig(image_size=params.get("image_size", 384), patch_size=v["patch_size"], embed_dim=v["width"],
                      mlp_dim=int(v["width"] * v["mlp_ratio"]), num_layers=layers, num_heads=v["heads"])


def _sam_from_hf(sam: dict[str, Any]) -> SamConfig:
  """transformers' SamVisionConfig dict."""
  for key, want in (("hidden_act", "gelu"), ("qkv_bias", True), ("use_abs_pos", True), ("use_rel_pos", True)):
    if sam.get(key, want) != want:
      raise ValueError(f"DeepSeek-VL's SAM tower has {key}={want!r}; this config has {sam[key]!r}.")
  hidden = sam.get("hidden_size", 768)
  return SamConfig(
      image_size=sam.get("image_size", 1024), patch_size=sam.get("patch_size", 16), embed_dim=hidden,
      mlp_dim=sam.get("mlp_dim") or int(hidden * sam.get("mlp_ratio", 4.0)),
      num_layers=sam.get("num_hidden_layers", 12), num_heads=sam.get("num_attention_heads", 12),
      window_size=sam.get("window_size", 14), global_attn_indexes=tuple(sam.get("global_attn_indexes", (2, 5, 8, 11))),
      neck_dim=sam.get("output_channels", 256), norm_eps=sam.get("layer_norm_eps", 1e-6))


# Ref: deepseek_vl/models/sam.py SAM_MODEL_CONFIG; create_sam_vit fixes patch 16, window 14, MLP ratio 4 and a
# 256-channel neck.
_SAM_VARIANTS = {"sam_b_downsample": dict(width=768, layers=12, heads=12, global_attn_indexes=(2, 5, 8, 11))}
_SAM_FIXED = dict(patch_size=16, window_size=14, mlp_ratio=4.0, neck_dim=256)


def _sam_from_original(params: dict[str, Any]) -> SamConfig:
  """`high_res_cfg` of the original HybridVisionTower. As for SigLIP, the variant's keys (and `patch_size`,
  `window_size`, `mlp_ratio`, `neck_dim`) may be overridden, for tiny test checkpoints."""
  name = params.get("model_name", "")
  if name not in _SAM_VARIANTS:
    raise ValueError(f"Unsupported high-res tower model_name {name!r}; expected one of {sorted(_SAM_VARIANTS)}.")
  base = {**_SAM_VARIANTS[name], **_SAM_FIXED}
  v = {**base, **{k: params[k] for k in base if k in params}}
  return SamConfig(image_size=params.get("image_size", 1024), patch_size=v["patch_size"], embed_dim=v["width"],
                   mlp_dim=int(v["width"] * v["mlp_ratio"]), num_layers=v["layers"], num_heads=v["heads"],
                   window_size=v["window_size"], global_attn_indexes=tuple(v["global_attn_indexes"]),
                   neck_dim=v["neck_dim"])


def from_hf_config(cfg: dict[str, Any], *, image_token_id: int | None = None) -> ModelConfig:
  """Builds a ModelConfig from a checkpoint's parsed `config.json` (either layout).

  Args:
    cfg: the parsed JSON.
    image_token_id: used when the config itself names none (the original layout); the converter reads it
      from the tokenizer files. Defaults to 100015, DeepSeek's `<image_placeholder>`.
  """
  model_type = cfg.get("model_type")
  high_res = None
  if model_type in HF_MODEL_TYPES:
    hybrid = model_type == "deepseek_vl_hybrid"
    keys = ("text_config", "vision_config") + (("high_res_vision_config",) if hybrid else ())
    for key in keys:
      if not isinstance(cfg.get(key), dict):
        raise ValueError(f"A {model_type!r} config.json needs a '{key}' object; it has {sorted(cfg)}.")
    text = _llama_from_dict(cfg["text_config"])
    vision = _siglip_from_hf(cfg["vision_config"])
    if hybrid:
      high_res = _sam_from_hf(cfg["high_res_vision_config"])
      aligner = AlignerConfig(kind="hybrid_split_mlp_gelu", in_dim=vision.embed_dim, out_dim=text.embed_dim,
                              high_res_in_dim=high_res.out_dim)
    else:
      aligner = AlignerConfig(in_dim=vision.embed_dim, out_dim=text.embed_dim)
    token = cfg.get("image_token_id", image_token_id if image_token_id is not None else 100015)
  elif model_type == "multi_modality":
    for key in ("language_config", "vision_config", "aligner_config"):
      if not isinstance(cfg.get(key), dict):
        raise ValueError(f"A 'multi_modality' config.json needs a '{key}' object; it has {sorted(cfg)}.")
    text = _llama_from_dict(cfg["language_config"])
    vcfg, ap = cfg["vision_config"], cfg["aligner_config"].get("params", {})
    tower, projector = vcfg.get("cls", "CLIPVisionTower"), ap.get("projector_type", "mlp_gelu")
    if tower == "CLIPVisionTower" and projector == "mlp_gelu":
      vision = _siglip_from_original(vcfg.get("params", {}))
      aligner = AlignerConfig(in_dim=ap.get("input_dim", vision.embed_dim),
                              out_dim=ap.get("n_embed", text.embed_dim), depth=ap.get("depth", 2))
    elif tower == "HybridVisionTower" and projector == "low_high_hybrid_split_mlp_gelu":
      params = vcfg.get("params", {})
      vision = _siglip_from_original(params.get("low_res_cfg", {}))
      high_res = _sam_from_original(params.get("high_res_cfg", {}))
      aligner = AlignerConfig(kind="hybrid_split_mlp_gelu", in_dim=vision.embed_dim,
                              high_res_in_dim=ap.get("input_dim", high_res.out_dim),
                              out_dim=ap.get("n_embed", text.embed_dim), depth=ap.get("depth", 2))
    else:
      raise ValueError(f"Unsupported vision tower / projector pair ({tower!r}, {projector!r}); expected "
                       "('CLIPVisionTower', 'mlp_gelu') or ('HybridVisionTower', 'low_high_hybrid_split_mlp_gelu').")
    token = image_token_id if image_token_id is not None else 100015
  else:
    raise ValueError(f"Unknown model_type {model_type!r} in config.json; expected one of "
                     f"{HF_MODEL_TYPES + ORIGINAL_MODEL_TYPES} (a DeepSeek-VL checkpoint in the transformers "
                     "'-hf' or the original deepseek-ai layout).")
  return ModelConfig(text=text, vision=vision, aligner=aligner, high_res=high_res, image_token_id=token)


def hf_ties_embeddings(cfg: dict[str, Any]) -> bool:
  """Whether the checkpoint config says lm_head shares the embedding (only used when lm_head is absent)."""
  text = cfg.get("text_config") or cfg.get("language_config") or {}
  return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def load_json(path) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)
