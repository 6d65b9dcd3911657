"""The PyTorch reference: tiny random transformers DeepSeek-VL models, checkpoints written from them, and
helpers that run them on our input layout.

Nothing here is downloaded: every model is built from a config with random weights.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen
import jax
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLHybridConfig,
                          DeepseekVLHybridForConditionalGeneration)

from dvl_jax import testing
from dvl_jax.convert.keymap import param_path, to_target_layout
from dvl_jax.processing import chat
from dvl_jax.testing import BOS, EOS, IMAGE, hf_image_processor, write_tokenizer  # noqa: F401 (re-exported)

IMAGE_TOKEN_ID = 5  # tiny vocabularies put <image_placeholder> low

# Tiny configs: (text overrides, vision overrides). MHA like DeepSeek, GQA, and multi-query.
TINY = {
    "mha": (dict(num_attention_heads=4, num_key_value_heads=4), dict()),
    "gqa": (dict(num_attention_heads=4, num_key_value_heads=2), dict(num_attention_heads=4)),
    "mqa_deep": (dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3, head_dim=16),
                 dict(num_hidden_layers=3, patch_size=16)),
}


def hf_config(name: str = "gqa", **top) -> DeepseekVLConfig:
  text, vision = TINY[name]
  return DeepseekVLConfig(
      text_config={**dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-6), **text},
      vision_config={**dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                            hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=False), **vision},
      image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=top.pop("tie_word_embeddings", False), **top)


# Tiny hybrid configs: SAM overrides. SigLIP is 32 px / patch 8 (a 4 x 4 grid); SAM is 64 px / patch 8 (8 x 8),
# resized to 16 x 16 and halved twice back to 4 x 4. SigLIP width 24 = 4 x the neck's 6 channels, as in the
# 7B (1024 = 4 x 256), so the original layout's single aligner input_dim fits both.
TINY_HYBRID = {
    "window_divides": dict(window_size=4, global_attn_indexes=[1, 3], num_hidden_layers=4),
    "window_pads": dict(window_size=3, global_attn_indexes=[2], num_hidden_layers=3),
    "three_globals": dict(window_size=5, global_attn_indexes=[0, 2, 3], num_hidden_layers=4, num_attention_heads=4),
}


def hf_hybrid_config(name: str = "window_pads", **top) -> DeepseekVLHybridConfig:
  base = hf_config("gqa")
  return DeepseekVLHybridConfig(
      text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
      high_res_vision_config={**dict(model_type="sam_vision_model", hidden_size=16, output_channels=6,
                                     num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=32,
                                     layer_norm_eps=1e-6), **TINY_HYBRID[name]},
      image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False, **top)


def _randomise(model: torch.nn.Module) -> None:
  """Gives every weight a visible value: transformers initialises SAM at std 1e-10 and zeroes its position
  tables and the hybrid alpha, which would leave them untested. Norm weights get noise around 1."""
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key and key.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif "high_res" in key or "rel_pos" in key or "pos_embed" in key:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(torch.randn_like(p) / max(fan_in, 1) ** 0.5)
      elif "norm" in key:
        p.add_(0.1 * torch.randn_like(p))


def hf_model(name: str = "gqa", seed: int = 0, **top) -> DeepseekVLForConditionalGeneration:
  """A tiny random model; every weight, norms included, has a value a mistake would show in."""
  torch.manual_seed(seed)
  model = DeepseekVLForConditionalGeneration(hf_config(name, **top)).eval()
  _randomise(model)
  return model


def hf_hybrid_model(name: str = "window_pads", seed: int = 0, **top) -> DeepseekVLHybridForConditionalGeneration:
  torch.manual_seed(seed)
  model = DeepseekVLHybridForConditionalGeneration(hf_hybrid_config(name, **top)).eval()
  _randomise(model)
  return model


def tokens_per_image(model) -> int:
  v = model.config.vision_config
  return (v.image_size // v.patch_size) ** 2


def random_inputs(model, images_per_row: list[int], seq_len: int = 0, pad: list[int] | None = None, seed: int = 0):
  """A left-padded batch with images_per_row[b] images spliced into row b.

  Returns (input_ids [B, T], attention_mask [B, T], pixel_values [B, N, S, S, 3] or None), numpy.
  """
  rng = np.random.default_rng(seed)
  p = tokens_per_image(model)
  s = model.config.vision_config.image_size
  vocab = model.config.text_config.vocab_size
  b, n = len(images_per_row), max(images_per_row)
  pad = pad or [0] * b
  t = seq_len or max(k * (p + 3) + 5 + pd for k, pd in zip(images_per_row, pad))
  ids = rng.integers(IMAGE_TOKEN_ID + 1, vocab, size=(b, t))
  mask = np.ones((b, t), np.int64)
  for row, (k, pd) in enumerate(zip(images_per_row, pad)):
    mask[row, :pd] = 0
    ids[row, :pd] = 1  # the pad id
    for i in range(k):
      start = pd + 2 + i * (p + 3)
      ids[row, start:start + p] = IMAGE_TOKEN_ID
  pixels = rng.standard_normal((b, n, s, s, 3)).astype(np.float32) if n else None
  high_cfg = getattr(model.config, "high_res_vision_config", None)
  if high_cfg is not None:
    hs = high_cfg.image_size
    return ids, mask, pixels, (rng.standard_normal((b, n, hs, hs, 3)).astype(np.float32) if n else None)
  return ids, mask, pixels


def to_torch_images(pixel_values, images_per_row) -> torch.Tensor:
  """Our [B, N, S, S, 3] slots -> transformers' [num_images, 3, S, S]: the images actually used, row-major."""
  images = [pixel_values[b, i] for b, k in enumerate(images_per_row) for i in range(k)]
  return torch.tensor(np.stack(images)).permute(0, 3, 1, 2)


def hf_logits(model, input_ids, attention_mask=None, pixel_values=None, images_per_row=None,
              high_res_pixel_values=None) -> np.ndarray:
  """The reference logits for our input layout, with positions from the attention mask as in generate."""
  kwargs = {}
  if attention_mask is not None:
    mask = torch.tensor(attention_mask)
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    kwargs.update(attention_mask=mask, position_ids=pos)
  if pixel_values is not None:
    kwargs["pixel_values"] = to_torch_images(pixel_values, images_per_row)
  if high_res_pixel_values is not None:
    kwargs["high_res_pixel_values"] = to_torch_images(high_res_pixel_values, images_per_row)
  with torch.no_grad():
    return model(input_ids=torch.tensor(input_ids), **kwargs).logits.float().numpy()


def max_rel_err(ours, ref, mask=None) -> float:
  """max |ours - ref| / max |ref| over the positions where mask is 1 (all if None)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    keep = np.asarray(mask).astype(bool)
    ours, ref = ours[keep], ref[keep]
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_params(flax_module, torch_module, *args, **kwargs) -> dict:
  """Params for `flax_module` (initialised on `args`) holding the weights of `torch_module`."""
  params = flax.linen.meta.unbox(flax_module.init(jax.random.key(0), *args, **kwargs)["params"])
  return load_torch_module(params, torch_module)


def load_torch_module(params: dict, module: torch.nn.Module) -> dict:
  """Our params for a block, filled from the weights of its transformers counterpart by the converter's own
  name rule (keymap.param_path) and layout rule (keymap.to_target_layout). Every param must be filled."""
  out = jax.tree.map(np.asarray, params)  # new containers, same shapes
  filled = set()
  for name, tensor in module.state_dict().items():
    path = param_path(out, name)
    assert path is not None, f"{name} has no counterpart in our params"
    node = out
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = to_target_layout(tensor.detach().float().numpy(), node[path[-1]].shape, name, path)
    filled.add(path)
  every = {tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(out)[0]}
  assert filled == every, f"params not filled from torch: {sorted(every - filled)}"
  return out


# ----- the original deepseek-ai key layout, written from an -hf checkpoint -----
# Ref: ../shared/ARCHITECTURE.md 4.2 (original keys) and 4.3 (the map), applied in reverse. {low} is the SigLIP
# prefix: vision_model.vision_tower. (1.3B) or vision_model.vision_tower_low.vision_tower. (7B).
_SAM_ORIG = "vision_model.vision_tower_high.vision_tower."
_NECK_ORIG = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
_TO_ORIGINAL = [
    (r"model\.language_model\.(.*)", r"language_model.model.\1"),
    (r"lm_head\.(.*)", r"language_model.lm_head.\1"),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight", r"{low}pos_embed"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.(.*)", r"{low}patch_embed.proj.\1"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"{low}blocks.\1.attn.proj.\2"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(.*)", r"{low}blocks.\1.norm\2.\3"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.(.*)", r"{low}blocks.\1.mlp.\2"),
    (r"model\.vision_model\.post_layernorm\.(.*)", r"{low}norm.\1"),
    (r"model\.aligner\.linear1\.(.*)", r"aligner.layers.0.\1"),
    (r"model\.aligner\.linear2\.(.*)", r"aligner.layers.2.\1"),
    (r"model\.aligner\.high_res_vision_proj\.(.*)", r"aligner.high_up_proj.\1"),
    (r"model\.aligner\.vision_proj\.(.*)", r"aligner.low_up_proj.\1"),
    (r"model\.aligner\.proj\.(.*)", r"aligner.layers.1.\1"),
    (r"model\.high_res_vision_model\.vision_encoder\.pos_embed", _SAM_ORIG + "pos_embed"),
    (r"model\.high_res_vision_model\.vision_encoder\.patch_embed\.projection\.(.*)",
     _SAM_ORIG + r"patch_embed.proj.\1"),
    (r"model\.high_res_vision_model\.vision_encoder\.layers\.(\d+)\.layer_norm([12])\.(.*)",
     _SAM_ORIG + r"blocks.\1.norm\2.\3"),
    (r"model\.high_res_vision_model\.vision_encoder\.layers\.(\d+)\.(.*)", _SAM_ORIG + r"blocks.\1.\2"),
    (r"model\.high_res_vision_model\.vision_encoder\.neck\.(\w+)\.(.*)", lambda m: f"{_SAM_ORIG}neck.{_NECK_ORIG[m[1]]}.{m[2]}"),
    (r"model\.high_res_vision_neck\.(\w+)\.(.*)", lambda m: f"{_SAM_ORIG}neck_hd.{_NECK_ORIG[m[1]]}.{m[2]}"),
    (r"model\.high_res_vision_proj\.conv(\d)\.(.*)", lambda m: f"{_SAM_ORIG}downsamples.{int(m[1]) - 1}.{m[2]}"),
    (r"model\.high_res_vision_alpha", _SAM_ORIG + "hd_alpha_downsamples"),
]


def write_original_layout(hf_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> None:
  """Rewrites a tiny -hf checkpoint the way deepseek-ai/* stores it: fused SigLIP qkv, pos_embed (1, P, D),
  language_model.lm_head, aligner.layers.N (or high_up_proj / low_up_proj), SAM blocks/neck/neck_hd/downsamples,
  the unused attn_pool head and hybrid layer norms, and a MultiModalityConfig."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  hybrid = "high_res_vision_config" in hf
  low = "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."
  sd = load_file(os.path.join(hf_dir, "model.safetensors"))
  out = {}
  qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
  for key, t in sd.items():
    m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
    if m:
      qkv.setdefault((m[1], m[3]), {})[m[2]] = t
      continue
    for pattern, repl in _TO_ORIGINAL:
      if m := re.fullmatch(pattern, key):
        name = repl(m) if callable(repl) else m.expand(repl.replace("{low}", low))
        out[name] = t[None] if name == low + "pos_embed" else t
        break
    else:
      raise AssertionError(f"no original name for {key}")
  for (layer, kind), parts in qkv.items():
    out[f"{low}blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"])
  width = sd["model.vision_model.post_layernorm.weight"].shape[0]
  out[low + "attn_pool.latent"] = torch.randn(1, 1, width)  # built but never used
  out[low + "attn_pool.kv.weight"] = torch.randn(2 * width, width)
  if hybrid:  # HybridVisionTower builds these and never uses them
    out["vision_model.high_layer_norm.weight"] = torch.ones(width)
    out["vision_model.low_layer_norm.bias"] = torch.zeros(width)
  if dtype is not None:
    out = {k: v.to(dtype) for k, v in out.items()}
  save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "model.safetensors"))

  text, vision = hf["text_config"], hf["vision_config"]
  siglip = {"model_name": "siglip_large_patch16_384", "image_size": vision["image_size"], "select_feature": "same",
            "select_layer": -1, "patch_size": vision["patch_size"], "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
            "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]}
  language = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "rms_norm_eps")}
  if "head_dim" in text:
    language["head_dim"] = text["head_dim"]
  if hybrid:
    sam = hf["high_res_vision_config"]
    vision_config = {"cls": "HybridVisionTower", "params": {"concat_type": "tuple", "low_res_cfg": siglip, "high_res_cfg": {
        "model_name": "sam_b_downsample", "image_size": sam["image_size"], "select_feature": "same",
        "select_layer": -1, "output_dim": 4 * sam["output_channels"], "patch_size": sam["patch_size"],
        "width": sam["hidden_size"], "layers": sam["num_hidden_layers"], "heads": sam["num_attention_heads"],
        "global_attn_indexes": sam["global_attn_indexes"], "window_size": sam["window_size"],
        "mlp_ratio": sam["mlp_dim"] / sam["hidden_size"], "neck_dim": sam["output_channels"]}}}
    aligner = {"projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2,
               "input_dim": 4 * sam["output_channels"], "n_embed": text["hidden_size"]}
  else:
    vision_config = {"cls": "CLIPVisionTower", "params": siglip}
    aligner = {"projector_type": "mlp_gelu", "depth": 2, "input_dim": vision["hidden_size"],
               "n_embed": text["hidden_size"]}
  config = {"model_type": "multi_modality", "language_config": language, "vision_config": vision_config,
            "aligner_config": {"cls": "MlpProjector", "params": aligner}}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  # The original names the image token only in the tokenizer files.
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"added_tokens_decoder": {str(IMAGE_TOKEN_ID): {"content": "<image_placeholder>", "special": False}}},
              f)


# ----- the reference processor (built by dvl_jax.testing) -----
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def user(*items):
  """A transformers-format user message: items ending in .png are image paths, the others text."""
  return {"role": "user", "content": [{"type": "image", "path": x} if x.endswith(".png") else {"type": "text", "text": x}
                                      for x in items]}


def assistant(text):
  return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_template() -> str:
  return chat.hf_chat_template()


def hf_processor(directory: str, hybrid: bool = False, num_image_tokens: int = 576, **sizes):
  """A transformers DeepseekVL(Hybrid)Processor with the tiny tokenizer and the -hf chat template, saved."""
  return testing.hf_processor(directory, hybrid, num_image_tokens, chat_template=chat_template(), **sizes)


def hf_model_for_processor(ref_proc, directory: str, seed: int = 0) -> DeepseekVLForConditionalGeneration:
  """A tiny random model (the "gqa" config) sized to `ref_proc`'s tokenizer and image tokens, with EOS/pad from
  the tokenizer, saved to `directory` beside the processor files."""
  base = hf_config("gqa").to_dict()
  base["text_config"]["vocab_size"] = len(ref_proc.tokenizer)
  torch.manual_seed(seed)
  model = DeepseekVLForConditionalGeneration(DeepseekVLConfig(
      text_config=base["text_config"], vision_config=base["vision_config"], tie_word_embeddings=False,
      image_token_id=ref_proc.image_token_id)).eval()
  _randomise(model)
  model.generation_config.eos_token_id = model.generation_config.pad_token_id = ref_proc.tokenizer.eos_token_id
  model.save_pretrained(directory)
  return model


def converted(ref_model, tmp_path_factory):
  """Our model loaded from `ref_model`, saved and converted as a user's checkpoint would be."""
  import dvl_jax
  from dvl_jax.convert import convert_checkpoint

  src, dst = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("dvl") / "ckpt"
  ref_model.save_pretrained(src)
  convert_checkpoint(src, dst, log=lambda *_: None)
  return dvl_jax.load(dst)
