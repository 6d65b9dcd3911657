"""Model architecture configs: frozen, hashable dataclasses, presets, and our own config file (dvl_config.json,
`ModelConfig.to_dict`/`from_dict`). A PyTorch checkpoint's config.json is read by dvl_jax/convert/hf_config.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")
# Attention implementations (dvl_jax/nn/attention_impls.py): "auto" picks by backend when the model is traced
# (cpu -> "cpu", gpu -> "xla", tpu -> "splash" where the shapes allow it, else "xla").
ATTENTION_IMPLS = ("auto", "cpu", "xla", "splash")


def _check_positive(obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}.")


def _check_attention(obj: Any) -> None:
  if obj.attention not in ATTENTION_IMPLS:
    raise ValueError(f"{type(obj).__name__}.attention must be one of {ATTENTION_IMPLS}, got {obj.attention!r}; "
                     "\"auto\" picks by backend.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """The LLaMA-style decoder. Defaults: DeepSeek-VL 1.3B.

  `attention`, here and in the towers' configs, names the attention implementation, one of ATTENTION_IMPLS: a
  choice of kernel, not of weights (`ModelConfig.with_attention` sets every tower's at once).
  """

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
  attention: str = "auto"

  def __post_init__(self):
    _check_attention(self)
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
    _check_attention(self)
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
  attention: str = "auto"  # see LlamaConfig

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
  attention: str = "auto"  # see LlamaConfig

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

  def with_attention(self, attention: str) -> ModelConfig:
    """This config with every tower's (and the decoder's) attention implementation set to `attention`."""
    sub = lambda c: None if c is None else dataclasses.replace(c, attention=attention)
    return self.replace(text=sub(self.text), vision=sub(self.vision), high_res=sub(self.high_res))

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


def shapes() -> ModelConfig:
  """The shapes captioner (configs/shapes/, shipped as the default checkpoint): SigLIP-style (4 x 128) at 64 px with
  8 px patches (64 image tokens; from scratch, a tower at 64 / 8 tells circles from squares sooner than at
  128 / 16), a 4 x 192 LLaMA; its tokenizer (dvl_jax.data.shapes) puts <image_placeholder> at id 2."""
  return ModelConfig(
      text=LlamaConfig(vocab_size=512, embed_dim=192, mlp_dim=512, num_layers=4, num_heads=4, num_kv_heads=4,
                       head_dim=48, max_position_embeddings=512),
      vision=SiglipConfig(image_size=64, patch_size=8, embed_dim=128, mlp_dim=512, num_layers=4, num_heads=4),
      aligner=AlignerConfig(in_dim=128, out_dim=192),
      image_token_id=2,
  )


PRESETS = {
    "deepseek-vl-1.3b-chat": deepseek_vl_1_3b,
    "deepseek-vl-7b-chat": deepseek_vl_7b,
    "shapes": shapes,
    "tiny": tiny,
    "tiny-hybrid": tiny_hybrid,
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name]()


# ----- sizes -----
def num_params(tree) -> int:
  """Counts the elements of a pytree of arrays or ShapeDtypeStructs."""
  import jax  # local: config.py stays importable without touching devices

  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
