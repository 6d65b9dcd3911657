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
from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

from dvl_jax.convert.keymap import param_path, to_target_layout

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


def hf_model(name: str = "gqa", seed: int = 0, **top) -> DeepseekVLForConditionalGeneration:
  """A tiny random model. Norm weights are randomised too, so a swapped scale/bias would show."""
  torch.manual_seed(seed)
  model = DeepseekVLForConditionalGeneration(hf_config(name, **top)).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:
        p.add_(0.1 * torch.randn_like(p))
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
  return ids, mask, pixels


def hf_logits(model, input_ids, attention_mask=None, pixel_values=None, images_per_row=None) -> np.ndarray:
  """The reference logits for our input layout: the images actually referenced, flattened row-major into
  transformers' [num_images, 3, S, S], and positions from the attention mask as in generate."""
  kwargs = {}
  if attention_mask is not None:
    mask = torch.tensor(attention_mask)
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    kwargs.update(attention_mask=mask, position_ids=pos)
  if pixel_values is not None:
    images = [pixel_values[b, i] for b, k in enumerate(images_per_row) for i in range(k)]
    kwargs["pixel_values"] = torch.tensor(np.stack(images)).permute(0, 3, 1, 2)
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
    node[path[-1]] = to_target_layout(tensor.detach().float().numpy(), node[path[-1]].shape, name)
    filled.add(path)
  every = {tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(out)[0]}
  assert filled == every, f"params not filled from torch: {sorted(every - filled)}"
  return out


# ----- the original deepseek-ai key layout, written from an -hf checkpoint -----
# Ref: ../shared/ARCHITECTURE.md 4.2 (original keys) and 4.3 (the map), applied in reverse.
_TO_ORIGINAL = [
    (r"model\.language_model\.(.*)", r"language_model.model.\1"),
    (r"lm_head\.(.*)", r"language_model.lm_head.\1"),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight", r"vision_model.vision_tower.pos_embed"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.(.*)", r"vision_model.vision_tower.patch_embed.proj.\1"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)",
     r"vision_model.vision_tower.blocks.\1.attn.proj.\2"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(.*)",
     r"vision_model.vision_tower.blocks.\1.norm\2.\3"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.(.*)", r"vision_model.vision_tower.blocks.\1.mlp.\2"),
    (r"model\.vision_model\.post_layernorm\.(.*)", r"vision_model.vision_tower.norm.\1"),
    (r"model\.aligner\.linear1\.(.*)", r"aligner.layers.0.\1"),
    (r"model\.aligner\.linear2\.(.*)", r"aligner.layers.2.\1"),
]


def write_original_layout(hf_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> None:
  """Rewrites a tiny -hf checkpoint the way deepseek-ai/* stores it: fused qkv, pos_embed (1, P, D),
  language_model.lm_head, aligner.layers.N, the unused attn_pool head, and a MultiModalityConfig."""
  os.makedirs(out_dir, exist_ok=True)
  sd = load_file(os.path.join(hf_dir, "model.safetensors"))
  out = {}
  qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
  for key, t in sd.items():
    m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
    if m:
      qkv.setdefault((m[1], m[3]), {})[m[2]] = t
      continue
    for pattern, repl in _TO_ORIGINAL:
      if re.fullmatch(pattern, key):
        name = re.sub(pattern, repl, key)
        out[name] = t[None] if name.endswith("pos_embed") else t
        break
    else:
      raise AssertionError(f"no original name for {key}")
  for (layer, kind), parts in qkv.items():
    out[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"])
  width = sd["model.vision_model.post_layernorm.weight"].shape[0]
  out["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, width)  # built but never used
  out["vision_model.vision_tower.attn_pool.kv.weight"] = torch.randn(2 * width, width)
  if dtype is not None:
    out = {k: v.to(dtype) for k, v in out.items()}
  save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "model.safetensors"))

  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  text, vision = hf["text_config"], hf["vision_config"]
  config = {
      "model_type": "multi_modality",
      "language_config": {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                "max_position_embeddings", "rms_norm_eps")} | (
                                                    {"head_dim": text["head_dim"]} if "head_dim" in text else {}),
      "vision_config": {"cls": "CLIPVisionTower", "params": {
          "model_name": "siglip_large_patch16_384", "image_size": vision["image_size"], "select_feature": "same",
          "select_layer": -1, "patch_size": vision["patch_size"], "width": vision["hidden_size"],
          "layers": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
          "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]}},
      "aligner_config": {"cls": "MlpProjector", "params": {
          "projector_type": "mlp_gelu", "depth": 2, "input_dim": vision["hidden_size"],
          "n_embed": text["hidden_size"]}},
  }
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  # The original names the image token only in the tokenizer files.
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"added_tokens_decoder": {str(IMAGE_TOKEN_ID): {"content": "<image_placeholder>", "special": False}}},
              f)
