"""Model architecture configs: frozen, hashable dataclasses, presets, and parsing of checkpoint configs.

Two `config.json` layouts are read:
- `-hf` (transformers' `DeepseekVLConfig`): `{"model_type": "deepseek_vl", "text_config": {...llama},
  "vision_config": {...siglip_vision_model}, "image_token_id": ...}`;
- original `deepseek-ai/*` (`MultiModalityConfig`): `{"model_type": "multi_modality", "language_config":
  {...LlamaConfig kwargs}, "vision_config": {"cls": "CLIPVisionTower", "params": {"model_name": ...}},
  "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", ...}}}`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def _check_positive(obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """The LLaMA-style decoder. Defaults: DeepSeek-VL 1.3B."""

  vocab_size: int = 102400
  embed_dim: int = 2048
  mlp_dim: int = 5632
  num_layers: int = 24
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 128
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  max_position_embeddings: int = 16384

  def __post_init__(self):
    _check_positive(self, "vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}).")


class _VitGeometry:
  """Checks and derived sizes shared by the two image towers' configs."""

  image_size: int
  patch_size: int
  embed_dim: int
  num_heads: int

  def _check_geometry(self, *positive: str) -> None:
    _check_positive(self, "image_size", "patch_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", *positive)
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size}).")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim}).")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipConfig(_VitGeometry):
  """The SigLIP ViT as DeepSeek-VL uses it (no class token, no attention-pool head, final LayerNorm applied).

  Defaults: `siglip_large_patch16_384`.
  """

  image_size: int = 384
  patch_size: int = 16
  embed_dim: int = 1024
  mlp_dim: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  norm_eps: float = 1e-6

  def __post_init__(self):
    self._check_geometry()

  @property
  def num_patches(self) -> int:
    return self.grid_size**2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamConfig(_VitGeometry):
  """The SAM-B ViTDet high-resolution tower of the hybrid (7B) model. Defaults: `sam_b_downsample`.

  Blocks in `global_attn_indexes` attend over the whole grid; the others within `window_size` windows. The
  neck maps to `neck_dim` channels and the two stride-2 downsample convs to 2x, then 4x `neck_dim`.
  """

  image_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  mlp_dim: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  neck_dim: int = 256
  norm_eps: float = 1e-6

  def __post_init__(self):
    self._check_geometry("window_size", "neck_dim")
    object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
    if bad or not self.global_attn_indexes:
      raise ValueError(f"global_attn_indexes {list(self.global_attn_indexes)} must name at least one of the "
                       f"{self.num_layers} layers (DeepSeek-VL reads the first global block's output).")

  @property
  def out_dim(self) -> int:
    """Channels after the two downsample convs."""
    return 4 * self.neck_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignerConfig:
  """The projector from vision features to the decoder's embedding space.

  kind "mlp_gelu": Linear(in_dim, out_dim), then (GELU, Linear(out_dim, out_dim)) x (depth - 1).
  kind "hybrid_split_mlp_gelu" (7B): Linear(high_res_in_dim, out_dim // 2) on the high-res features and
  Linear(in_dim, out_dim // 2) on the low-res ones, concatenated (high first), GELU, Linear(out_dim, out_dim).
  """

  kind: str = "mlp_gelu"
  in_dim: int = 1024
  out_dim: int = 2048
  depth: int = 2
  high_res_in_dim: int = 0  # hybrid only

  def __post_init__(self):
    if self.kind not in ("mlp_gelu", "hybrid_split_mlp_gelu"):
      raise ValueError(f"Unknown aligner kind {self.kind!r}; expected 'mlp_gelu' or 'hybrid_split_mlp_gelu'.")
    _check_positive(self, "in_dim", "out_dim", "depth")
    if self.kind == "hybrid_split_mlp_gelu":
      _check_positive(self, "high_res_in_dim")
      if self.depth != 2 or self.out_dim % 2:
        raise ValueError(f"The hybrid aligner has depth 2 and an even out_dim; got depth={self.depth}, "
                         f"out_dim={self.out_dim}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A whole DeepSeek-VL model. `high_res` is set only for the hybrid (7B) model."""

  text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  vision: SiglipConfig = dataclasses.field(default_factory=SiglipConfig)
  aligner: AlignerConfig = dataclasses.field(default_factory=AlignerConfig)
  high_res: SamConfig | None = None
  image_token_id: int = 100015
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")
    if self.aligner.in_dim != self.vision.embed_dim:
      raise ValueError(f"aligner.in_dim ({self.aligner.in_dim}) must equal vision.embed_dim "
                       f"({self.vision.embed_dim}).")
    if self.aligner.out_dim != self.text.embed_dim:
      raise ValueError(f"aligner.out_dim ({self.aligner.out_dim}) must equal text.embed_dim "
                       f"({self.text.embed_dim}).")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary "
                       f"(vocab_size {self.text.vocab_size}).")
    if (self.high_res is None) != (self.aligner.kind == "mlp_gelu"):
      raise ValueError("The hybrid aligner ('hybrid_split_mlp_gelu') goes with a high_res tower and "
                       f"'mlp_gelu' without one; got aligner.kind={self.aligner.kind!r} and "
                       f"high_res={'set' if self.high_res else 'None'}.")
    if self.high_res is not None and self.aligner.high_res_in_dim != self.high_res.out_dim:
      raise ValueError(f"aligner.high_res_in_dim ({self.aligner.high_res_in_dim}) must equal the SAM tower's "
                       f"output channels, 4 * neck_dim = {self.high_res.out_dim}.")

  @property
  def tokens_per_image(self) -> int:
    return self.vision.num_patches

  @property
  def is_hybrid(self) -> bool:
    return self.high_res is not None

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  # ----- serialisation of our own config file -----
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    try:
      subs = {"text": LlamaConfig, "vision": SiglipConfig, "aligner": AlignerConfig, "high_res": SamConfig}
      for key, sub in subs.items():
        if d.get(key) is not None:
          d[key] = sub(**d[key])
      return cls(**d)
    except TypeError as e:
      raise ValueError(f"Malformed dvl_jax model config: {e}. Re-create it with convert/torch_to_orbax.py.") from e


# ----- presets -----
def deepseek_vl_1_3b() -> ModelConfig:
  """deepseek-ai/deepseek-vl-1.3b-chat (and -base): SigLIP-L/16 at 384 px, 24 x 2048 LLaMA."""
  return ModelConfig()


def deepseek_vl_7b() -> ModelConfig:
  """deepseek-ai/deepseek-vl-7b-chat: SAM-B at 1024 px beside SigLIP-L, 30 x 4096 LLaMA."""
  return ModelConfig(
      text=LlamaConfig(embed_dim=4096, mlp_dim=11008, num_layers=30, num_heads=32, num_kv_heads=32),
      high_res=SamConfig(),
      aligner=AlignerConfig(kind="hybrid_split_mlp_gelu", in_dim=1024, high_res_in_dim=1024, out_dim=4096),
  )


def tiny() -> ModelConfig:
  """A few-kilobyte model with the full structure (GQA included), for tests and demos."""
  return ModelConfig(
      text=LlamaConfig(vocab_size=256, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=1024),
      vision=SiglipConfig(image_size=64, patch_size=16, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=2),
      aligner=AlignerConfig(in_dim=32, out_dim=64),
      image_token_id=255,
  )


def tiny_hybrid() -> ModelConfig:
  """`tiny` with a tiny SAM tower (128 px, an 8 x 8 grid in windows of 3 that pad, one global block) and the
  hybrid aligner; every width divides by 8, so it shards over 8 devices under any strategy."""
  base = tiny()
  return base.replace(
      high_res=SamConfig(image_size=128, patch_size=16, embed_dim=32, mlp_dim=64, num_layers=3, num_heads=2,
                         window_size=3, global_attn_indexes=(1,), neck_dim=8),
      aligner=AlignerConfig(kind="hybrid_split_mlp_gelu", in_dim=32, high_res_in_dim=32, out_dim=64))


PRESETS = {
    "deepseek-vl-1.3b-chat": deepseek_vl_1_3b,
    "deepseek-vl-7b-chat": deepseek_vl_7b,
    "tiny": tiny,
    "tiny-hybrid": tiny_hybrid,
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name]()


# ----- checkpoint config.json parsing -----
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
      mlp_dim=sam.get("mlp_dim") or int(hidden * sam.get("mlp_ratio", 4.0)), num_layers=sam.get("num_hidden_layers", 12),
      num_heads=sam.get("num_attention_heads", 12), window_size=sam.get("window_size", 14),
      global_attn_indexes=tuple(sam.get("global_attn_indexes", (2, 5, 8, 11))), neck_dim=sam.get("output_channels", 256),
      norm_eps=sam.get("layer_norm_eps", 1e-6))


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
    keys = ("text_config", "vision_config") + (("high_res_vision_config",) if model_type == "deepseek_vl_hybrid" else ())
    for key in keys:
      if not isinstance(cfg.get(key), dict):
        raise ValueError(f"A {model_type!r} config.json needs a '{key}' object; it has {sorted(cfg)}.")
    text = _llama_from_dict(cfg["text_config"])
    vision = _siglip_from_hf(cfg["vision_config"])
    if model_type == "deepseek_vl_hybrid":
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


def num_params(tree) -> int:
  """Counts the elements of a pytree of arrays or ShapeDtypeStructs."""
  import jax  # local: config.py stays importable without touching devices

  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
