"""The map from checkpoint keys to dvl_jax param paths.

Two steps, each a table:
1. `ORIGINAL_RENAMES`: an original `deepseek-ai/*` key -> its transformers `-hf` name (the fused SigLIP `qkv`
   is split into q/k/v). Ref: transformers convert_deepseek_vl*_weights_to_hf.py; ../shared/ARCHITECTURE.md 4.
2. `HF_PREFIXES`: an `-hf` key prefix -> our subtree. Inside a block our module names are transformers'
   names, so the rest of the key maps mechanically: dots become slashes and a final `weight` becomes
   whichever of `kernel`, `scale`, `embedding` the target has (or the param itself).
Tensors that DeepSeek-VL builds but never uses are skipped by name (`SKIPPED`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

HF = "hf"
ORIGINAL = "original"

# Known-unused tensors, skipped by name. Ref: ARCHITECTURE.md 1.2, 1.3, 4.2.
SKIPPED = {
    ORIGINAL: (
        re.compile(r"vision_model\.(vision_tower|vision_tower_low\.vision_tower)\.attn_pool\."),  # SigLIP MAP head
        re.compile(r"vision_model\.(high|low)_layer_norm\."),  # built by HybridVisionTower, never used
    ),
    HF: (re.compile(r"model\.vision_model\.(vision_model\.)?head\."),),  # present only with vision_use_head
}

_SIGLIP = r"vision_model\.(?:vision_tower|vision_tower_low\.vision_tower)\."  # 1.3B, 7B low-res
_SAM = r"vision_model\.vision_tower_high\.vision_tower\."  # 7B high-res
_SAM_HF = "model.high_res_vision_model.vision_encoder."
_NECK = {"0": "conv1", "1": "layer_norm1", "2": "conv2", "3": "layer_norm2"}  # the SAM necks' nn.Sequential
# (pattern, replacement) pairs over full original keys; the first match wins.
ORIGINAL_RENAMES: list[tuple[str, str]] = [
    (r"language_model\.model\.(.*)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.(.*)", r"lm_head.\1"),
    (_SIGLIP + r"pos_embed", r"model.vision_model.embeddings.position_embedding.weight"),
    (_SIGLIP + r"patch_embed\.proj\.(.*)", r"model.vision_model.embeddings.patch_embedding.\1"),
    (_SIGLIP + r"blocks\.(\d+)\.attn\.qkv\.(.*)", r"model.vision_model.encoder.layers.\1.self_attn.{q,k,v}_proj.\2"),
    (_SIGLIP + r"blocks\.(\d+)\.attn\.proj\.(.*)", r"model.vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (_SIGLIP + r"blocks\.(\d+)\.norm([12])\.(.*)", r"model.vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (_SIGLIP + r"blocks\.(\d+)\.mlp\.(.*)", r"model.vision_model.encoder.layers.\1.mlp.\2"),
    (_SIGLIP + r"norm\.(.*)", r"model.vision_model.post_layernorm.\1"),
    (_SAM + r"pos_embed", _SAM_HF + "pos_embed"),
    (_SAM + r"patch_embed\.proj\.(.*)", _SAM_HF + r"patch_embed.projection.\1"),
    (_SAM + r"blocks\.(\d+)\.norm([12])\.(.*)", _SAM_HF + r"layers.\1.layer_norm\2.\3"),
    (_SAM + r"blocks\.(\d+)\.(attn|mlp)\.(.*)", _SAM_HF + r"layers.\1.\2.\3"),
    (_SAM + r"neck\.(\d)\.(.*)", lambda m: f"{_SAM_HF}neck.{_NECK.get(m[1], m[1])}.{m[2]}"),
    (_SAM + r"neck_hd\.(\d)\.(.*)", lambda m: f"model.high_res_vision_neck.{_NECK.get(m[1], m[1])}.{m[2]}"),
    (_SAM + r"downsamples\.(\d)\.(.*)", lambda m: f"model.high_res_vision_proj.conv{int(m[1]) + 1}.{m[2]}"),
    (_SAM + r"hd_alpha_downsamples", "model.high_res_vision_alpha"),
    # The hybrid projector: [GELU, Linear] after the split up-projections.
    (r"aligner\.high_up_proj\.(.*)", r"model.aligner.high_res_vision_proj.\1"),
    (r"aligner\.low_up_proj\.(.*)", r"model.aligner.vision_proj.\1"),
    (r"aligner\.layers\.1\.(.*)", r"model.aligner.proj.\1"),  # in "mlp_gelu" index 1 is a GELU, no params
    # MlpProjector "mlp_gelu": layers = [Linear, GELU, Linear, GELU, ...], so Linear k sits at index 2k.
    (r"aligner\.layers\.(\d+)\.(.*)", lambda m: f"model.aligner.linear{int(m[1]) // 2 + 1}.{m[2]}"),
]

# (-hf prefix, our subtree, whether the prefix's group 1 is a layer index into a scanned stack). A `{}` in
# the subtree takes group 1 instead (unscanned numbered blocks). A prefix may be a whole key (a bare param).
HF_PREFIXES: list[tuple[re.Pattern, str, bool]] = [
    (re.compile(p), t, stacked) for p, t, stacked in [
        (r"lm_head\.", "language_model/lm_head", False),
        (r"model\.high_res_vision_model\.vision_encoder\.layers\.(\d+)\.",
         "high_res_vision_model/vision_encoder/layers_{}", False),
        (r"model\.high_res_vision_model\.vision_encoder\.patch_embed\.projection\.",
         "high_res_vision_model/vision_encoder/patch_embed", False),
        (r"model\.high_res_vision_model\.vision_encoder\.", "high_res_vision_model/vision_encoder", False),
        (r"model\.high_res_vision_neck\.", "high_res_vision_model/neck_hd", False),
        (r"model\.high_res_vision_proj\.conv(\d)\.", "high_res_vision_model/downsample{}", False),
        (r"model\.high_res_vision_alpha$", "high_res_vision_model/alpha", False),
        (r"model\.language_model\.layers\.(\d+)\.", "language_model/layers_{}", False),
        (r"model\.language_model\.", "language_model", False),
        (r"model\.vision_model\.(?:vision_model\.)?encoder\.layers\.(\d+)\.", "vision_model/layers", True),
        (r"model\.vision_model\.(?:vision_model\.)?embeddings\.", "vision_model", False),
        (r"model\.vision_model\.(?:vision_model\.)?", "vision_model", False),
        (r"model\.aligner\.", "aligner", False),
    ]
]
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def detect_format(keys: list[str]) -> str:
  """'hf' or 'original', from the key names; a ValueError for anything else."""
  if any(k.startswith("model.language_model.") for k in keys):
    return HF
  if any(k.startswith(("language_model.model.", "vision_model.vision_tower")) for k in keys):  # also _low/_high
    return ORIGINAL
  raise ValueError("Unrecognised checkpoint key layout: expected transformers '-hf' keys "
                   "('model.language_model.…', 'model.vision_model.…', 'lm_head.weight') or original deepseek-ai "
                   f"keys ('language_model.model.…', 'vision_model.vision_tower.…'); found e.g. {keys[:5]}.")


def is_skipped(key: str, fmt: str) -> bool:
  return any(p.match(key) for p in SKIPPED[fmt])


def original_to_hf(key: str, tensor: np.ndarray) -> list[tuple[str, np.ndarray]] | None:
  """Renames one original key (splitting a fused qkv); None when no rule matches."""
  for pattern, repl in ORIGINAL_RENAMES:
    m = re.fullmatch(pattern, key)
    if m is None:
      continue
    name = repl(m) if callable(repl) else m.expand(repl)
    if name.endswith("position_embedding.weight"):  # SigLIP's (1, P, D) -> (P, D); SAM's stays 4-D
      tensor = tensor.reshape(tensor.shape[-2:])
    if "{q,k,v}" in name:  # rows are [q; k; v]. Ref: siglip_vit.py Attention.forward
      if tensor.shape[0] % 3:
        raise ValueError(f"{key}: a fused qkv tensor needs a first axis divisible by 3, got {tensor.shape}.")
      return [(name.replace("{q,k,v}", part), piece) for part, piece in zip("qkv", np.split(tensor, 3, axis=0))]
    return [(name, tensor)]
  return None


def hf_to_target(key: str, params: dict[str, Any]) -> tuple[tuple[str, ...], int | None] | None:
  """Maps an -hf key to (our param path, layer index or None); None when it names no param of ours."""
  for pattern, target, stacked in HF_PREFIXES:
    m = pattern.match(key)
    if m is None:
      continue
    subtree = tuple((target if stacked else target.format(*m.groups())).split("/"))
    rest = key[m.end():]
    if not rest:  # the prefix names a param itself
      return (subtree, None) if _is_leaf(get_path(params, subtree)) else None
    path = param_path(get_path(params, subtree), rest)
    return (subtree + path, int(m[1]) if stacked else None) if path else None
  return None


def param_path(params: Any, name: str) -> tuple[str, ...] | None:
  """The path in `params` of a block-relative transformers name such as `self_attn.q_proj.weight`.

  A final `weight` is a Linear/conv `kernel`, a norm `scale`, an `embedding`, or the param itself.
  """
  *parts, leaf = name.split(".")
  base = tuple(parts)
  candidates = [base + (w,) for w in _WEIGHT_LEAVES] + [base] if leaf == "weight" else [base + (leaf,)]
  return next((p for p in candidates if _is_leaf(get_path(params, p))), None)


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
  """tree[p0][p1]..., or None where a key is missing."""
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _is_leaf(x: Any) -> bool:
  return x is not None and not isinstance(x, dict)


def to_target_layout(tensor: np.ndarray, target_shape: tuple[int, ...], key: str, path: tuple[str, ...]) -> np.ndarray:
  """PyTorch layout -> ours, for the tensor `key` going to our param `path`. Conv kernels OIHW -> HWIO;
  everything else only splits or merges axes in place (our Linear kernels keep PyTorch's [out, in] order),
  so a transposed or mis-sized tensor is refused."""
  if path[-1] == "kernel" and tensor.ndim == 4:
    tensor = tensor.transpose(2, 3, 1, 0)
  if tensor.shape == target_shape:
    return tensor
  size = int(np.prod(target_shape))
  splits = {(int(np.prod(target_shape[:k])), size // max(1, int(np.prod(target_shape[:k]))))
            for k in range(len(target_shape) + 1)}
  if (tensor.ndim == 2 and tensor.shape in splits) or (tensor.ndim == 1 and tensor.size == size):
    return tensor.reshape(target_shape)
  raise ValueError(f"{key}: shape {tensor.shape} does not fit the model config, which expects {target_shape}.")

