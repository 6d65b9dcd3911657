"""FLOPs of one train step as MaxText counts them, and the rates made from them (tokens/s, images/s, MFU).

  flops = train_step_flops(config, paper_config("S3", total_steps=n), batch=8, seq_len=608, images_per_row=1)
  flops.total, flops.mfu(step_seconds, peak_flops_per_second), flops.tokens_per_second(step_seconds)

MaxText's rule (src/MaxText/maxtext_utils.py, calculate_tflops_training_per_device): every learnable weight's
matmuls (the q/k/v/o projections, the MLP, and the logits "embedding" matmul 2 * B * T * D * V) count 3 times
their forward FLOPs (forward, then the gradients of the input and of the weight); causal attention counts
4 * B * T^2 * N * H per layer (q.k^T and probs.v) halved for the causal mask, after Megatron-LM and NeMo, also
x3; gradient accumulation multiplies both; elementwise ops, norms, softmax and the optimizer are not counted.
Its vision towers (Gemma3, Llama4): the weights x3 when trained; frozen, x1 except the projector, x3; their
attention x1 either way (a trained tower's attention is counted x3 here).

Here the same rule, written for what each matmul must compute: its forward, plus the weight's gradient when
the weight is trained, plus the input's gradient when anything before it is trained:
- a trained weight inside a trained chain: x3 (MaxText's case): the LLM and the aligner in S2 and S3, SigLIP in S3;
- a frozen weight that passes a gradient down: x2: the frozen LLM of S1 (and its lm_head) backpropagates the
  activations to the aligner but computes no weight gradients;
- a frozen tower: x1, forward only (SigLIP in S1 and S2, SAM always; the step stops the gradient at its output);
- a trained weight whose input needs no gradient: x2: SigLIP's patch embedding in S3 (pixels), the aligner's
  input projections when the towers are frozen. MaxText counts these x3; XLA computes x2 (the compiled step
  has no such dot). The difference is < 0.1% of a step.
- attention (no weights): x3 wherever a gradient passes through it (both backward matmuls are needed), x1 in
  a frozen tower; the decoder's causal attention is half the square, as MaxText; the towers' is the full square.
A part (SigLIP, SAM, aligner, LLM) counts as trained when any of its params is.

Per image: SigLIP's patch embedding, its blocks (q, k, v, o, MLP) and attention over its P patches; for the
hybrid model SAM's patch embedding, its blocks (windowed blocks project and attend over the zero-padded
windows, as the model computes them; global blocks over the whole grid; the decomposed relative positions
q.R_h and q.R_w), its two necks (1x1 and 3x3 convs) and the two stride-2 downsample convs on both paths; the
aligner's linears per image token. All FLOPs are 2 per multiply-add.

Not counted (as MaxText): elementwise ops, norms, softmax, RoPE, activations, embedding lookups and the
splice of image features, SAM's bilinear resize (two small matmuls on XLA:CPU), the loss beyond the logits
matmul, the optimizer and clipping, and recomputation: remat (dvl_jax/nn/remat.py) and the chunked loss's
checkpointed logits run part of the forward again in the backward pass. That is work the hardware does and
MFU does not credit; `hlo_matmul_flops` counts what the compiled step really runs, recompute included (the
hardware FLOPs, for a hardware FLOPs utilisation).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax

from dvl_jax.config import ModelConfig, SamConfig, SiglipConfig
from dvl_jax.training.optimizer import OptimizerConfig, trainable_mask

# TrainedParts field -> the top-level key of its params.
_PARTS = {"vision": "vision_model", "high_res": "high_res_vision_model", "aligner": "aligner",
          "language_model": "language_model"}


@dataclasses.dataclass(frozen=True)
class TrainedParts:
  """Which parts of the model have trained params. All False: a forward pass only (inference FLOPs)."""

  vision: bool = False  # SigLIP (vision_model/)
  high_res: bool = False  # SAM (high_res_vision_model/), hybrid model only
  aligner: bool = False
  language_model: bool = False

  @classmethod
  def from_mask(cls, mask: Mapping[str, Any]) -> TrainedParts:
    """From a trainable_mask (a tree of bools shaped like the params)."""
    unknown = sorted(set(mask) - set(_PARTS.values()))
    if unknown:
      raise ValueError(f"The trainable mask has top-level keys {unknown} that are no part of DeepSeek-VL; "
                       f"expected some of {sorted(_PARTS.values())} (trainable_mask(params, optimizer)).")
    return cls(**{f: key in mask and any(jax.tree.leaves(mask[key])) for f, key in _PARTS.items()})

  @classmethod
  def from_optimizer(cls, config: ModelConfig, optimizer: OptimizerConfig) -> TrainedParts:
    """The parts whose params `optimizer` trains, in the model of `config` (abstract params, no memory)."""
    from dvl_jax.model import abstract_params  # local: model.py imports the training package's neighbours

    return cls.from_mask(trainable_mask(abstract_params(config), optimizer))


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """The FLOPs of one train step (all microbatches), by part, and the step's tokens and images.

  Attributes:
    decoder_weights: the decoder layers' projections and MLPs.
    attention: the decoder's causal attention (q.k^T and probs.v).
    logits: lm_head.
    vision: SigLIP (and SAM): patch embeddings, blocks, attention, SAM's necks and downsample convs.
    aligner: the projector from image features to the decoder's width.
    tokens: batch * seq_len, every position (padding too, as MaxText's max_target_length).
    images: batch * images_per_row.
  """

  decoder_weights: float
  attention: float
  logits: float
  vision: float
  aligner: float
  tokens: int
  images: int

  @property
  def total(self) -> float:
    return self.decoder_weights + self.attention + self.logits + self.vision + self.aligner

  def per_second(self, step_seconds: float) -> float:
    """The model FLOP/s achieved by a step that took `step_seconds`."""
    return self.total / step_seconds

  def mfu(self, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: total / step_seconds / peak, a fraction (recompute not credited)."""
    return self.total / step_seconds / peak_flops_per_second

  def tokens_per_second(self, step_seconds: float) -> float:
    return self.tokens / step_seconds

  def images_per_second(self, step_seconds: float) -> float:
    return self.images / step_seconds


def _times(trained: bool, input_grad: bool) -> int:
  """How many times a weight matmul's forward FLOPs a step costs: forward, dW if trained, dX if needed."""
  return 1 + int(trained) + int(input_grad)


def _conv(pixels_out: int, kernel: int, c_in: int, c_out: int) -> int:
  """Forward FLOPs of a 2-D convolution producing `pixels_out` output pixels (padding taps included)."""
  return 2 * pixels_out * kernel * kernel * c_in * c_out


def _conv_side(side: int, kernel: int, stride: int, pad: int) -> int:
  return (side + 2 * pad - kernel) // stride + 1


def siglip_forward(cfg: SiglipConfig) -> tuple[int, int, int]:
  """Forward FLOPs of SigLIP on one image: (patch embedding, the blocks' weights, attention)."""
  p, d = cfg.num_patches, cfg.embed_dim
  patch = _conv(p, cfg.patch_size, 3, d)
  weights = cfg.num_layers * 2 * p * (4 * d * d + 2 * d * cfg.mlp_dim)  # q, k, v, o; fc1, fc2
  attention = cfg.num_layers * 4 * p * p * d  # q.k^T and probs.v over all heads, D = N * H
  return patch, weights, attention


def sam_forward(cfg: SamConfig, out_grid: int) -> tuple[int, int, int]:
  """Forward FLOPs of the SAM branch on one image: (patch embedding, weights, attention).

  weights: the blocks' qkv and proj (on the zero-padded windows in windowed blocks), their MLPs, both necks
  and the downsample convs on both paths; attention: q.k^T, probs.v and the rel-pos terms q.R_h, q.R_w over
  each window (or the whole grid in a global block). out_grid: SigLIP's grid side (the features are resized
  to 4x it, then halved twice).
  """
  g, d, c, w = cfg.grid_size, cfg.embed_dim, cfg.neck_dim, cfg.window_size
  patch = _conv(g * g, cfg.patch_size, 3, d)
  padded_side = -(-g // w) * w  # windows zero-pad the grid up to a multiple of the window
  weights = attention = 0
  for i in range(cfg.num_layers):
    side, maps = (g, 1) if i in cfg.global_attn_indexes else (w, (padded_side // w) ** 2)
    n = side * side  # tokens per attention map
    weights += 2 * maps * n * 4 * d * d + 2 * g * g * 2 * d * cfg.mlp_dim  # qkv (3 d^2) + proj (d^2); MLP
    attention += maps * (4 * n * n * d + 2 * 2 * n * side * d)  # q.k^T, probs.v; q.R_h, q.R_w
  neck = _conv(g * g, 1, d, c) + _conv(g * g, 3, c, c)
  s1 = _conv_side(4 * out_grid, 3, 2, 1)
  s2 = _conv_side(s1, 3, 2, 1)
  down = _conv(s1 * s1, 3, c, 2 * c) + _conv(s2 * s2, 3, 2 * c, 4 * c)
  weights += 2 * neck + 2 * down  # neck and neck_hd; the downsample convs on both paths
  return patch, weights, attention


def train_step_flops(config: ModelConfig, trained: TrainedParts | OptimizerConfig | Mapping[str, Any], *,
                     batch: int, seq_len: int, images_per_row: int = 1,
                     padded_vocab_size: int | None = None, objective: str = "next_token") -> StepFlops:
  """The FLOPs of one train step over `batch` rows of `seq_len` tokens, counted as the module docstring says.

  Args:
    config: the model.
    trained: what the step trains: an OptimizerConfig (e.g. paper_config("S2", ...)), a trainable_mask, or
      TrainedParts (TrainedParts() for a forward pass only).
    batch: rows per step (all microbatches together).
    seq_len: tokens per row, image tokens included.
    images_per_row: images each row holds (each runs through the towers and the aligner).
    padded_vocab_size: lm_head's rows when a mesh pads the vocabulary (the matmul computes them); None: the
      config's vocab_size.
    objective: "next_token"; "bag_of_words" (training/bag_of_words.py: no decoder layer runs; lm_head
      scores the pooled image features at every position); "region_words" (region_words.py: lm_head scores
      every image token's features, one position more than the image tokens per row).
  Returns:
    StepFlops.
  """
  if isinstance(trained, OptimizerConfig):
    trained = TrainedParts.from_optimizer(config, trained)
  elif not isinstance(trained, TrainedParts):
    trained = TrainedParts.from_mask(trained)
  if not all(isinstance(v, int) and v > 0 for v in (batch, seq_len)):
    raise ValueError(f"batch and seq_len must be positive ints, got batch={batch!r}, seq_len={seq_len!r}.")
  if not isinstance(images_per_row, int) or images_per_row < 0:
    raise ValueError(f"images_per_row must be an int >= 0, got {images_per_row!r}.")
  if images_per_row * config.tokens_per_image > seq_len:
    raise ValueError(f"{images_per_row} images of {config.tokens_per_image} tokens do not fit in seq_len={seq_len}.")
  t = trained
  images, tokens = batch * images_per_row, batch * seq_len

  # Vision towers, per image.
  patch, weights, attn = siglip_forward(config.vision)
  vision = _times(t.vision, False) * patch + _times(t.vision, t.vision) * weights + (3 if t.vision else 1) * attn
  if config.is_hybrid:
    patch, weights, attn = sam_forward(config.high_res, config.vision.grid_size)
    vision += (_times(t.high_res, False) * patch + _times(t.high_res, t.high_res) * weights
               + (3 if t.high_res else 1) * attn)

  # Aligner, per image token; its input projections pass a gradient only into a trained tower.
  a, p = config.aligner, config.tokens_per_image
  if config.is_hybrid:
    first = (_times(t.aligner, t.high_res) * 2 * a.high_res_in_dim * (a.out_dim // 2)
             + _times(t.aligner, t.vision) * 2 * a.in_dim * (a.out_dim // 2))
  else:
    first = _times(t.aligner, t.vision) * 2 * a.in_dim * a.out_dim
  rest = _times(t.aligner, t.aligner or t.vision or t.high_res) * (a.depth - 1) * 2 * a.out_dim * a.out_dim
  aligner = p * (first + rest)

  # Decoder, per token; a gradient passes through it when it or anything before it is trained.
  c = config.text
  grad_in = t.language_model or t.aligner or t.vision or t.high_res
  per_token = 2 * (c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                   + c.num_heads * c.head_dim * c.embed_dim + 3 * c.embed_dim * c.mlp_dim)
  layers = 0 if objective in ("bag_of_words", "region_words") else c.num_layers
  scored = batch * (images_per_row * config.tokens_per_image + 1) if objective == "region_words" else tokens
  decoder = _times(t.language_model, grad_in) * layers * per_token * tokens
  attention = (3 if grad_in else 1) * layers * 4 * batch * seq_len**2 * c.num_heads * c.head_dim // 2
  vocab = padded_vocab_size or c.vocab_size
  logits = _times(t.language_model, grad_in) * 2 * c.embed_dim * vocab * scored
  return StepFlops(decoder_weights=float(decoder), attention=float(attention), logits=float(logits),
                   vision=float(vision * images), aligner=float(aligner * images), tokens=tokens, images=images)


# ----- the compiled step's own count -----
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(field: str, line: str) -> list[int]:
  m = re.search(field + r"=\{([\d,]*)\}", line)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _split_shape(rest: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' or '(s32[], f32[2]) while(...)' -> (shape, 'opcode(...)...')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _op_flops(opcode: str, out: list[int], operands: list[list[int] | None], line: str) -> int:
  if opcode == "dot":
    lhs = operands[0]
    return 2 * math.prod(out) * math.prod(lhs[i] for i in _dims("lhs_contracting_dims", line))
  # convolution: each output element is a dot over the kernel's window and its input features (per group).
  rhs = operands[1]
  labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
  window = math.prod(rhs[i] for i, ch in enumerate(labels) if ch.isdigit())
  return 2 * math.prod(out) * window * rhs[labels.index("i")]


def hlo_matmul_flops(hlo_text: str) -> float:
  """The FLOPs of every dot and convolution that a compiled XLA module runs, from its text.

  Each loop body counts as many times as it runs (XLA's `known_trip_count` on every while loop that jax's
  scans and maps lower to), each fused or called computation once per call. Unlike `cost_analysis()`, which
  counts a loop body once, this is the work the step does: recompute (remat, checkpointed loss chunks)
  included, the masked half of a causal attention that is computed anyway included.

  Args:
    hlo_text: `jax.jit(f).lower(...).compile().as_text()`.
  Raises:
    ValueError: a while loop without a known trip count (its work cannot be counted from the text).
  """
  comps: dict[str, tuple[int, list[tuple[str, int]]]] = {}
  shapes: dict[str, list[int] | None] = {}
  entry = name = None
  local, calls = 0, []
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name, local, calls = header.group(1), 0, []
      entry = name if line.startswith("ENTRY") else entry
      continue
    if line.startswith("}") and name is not None:
      comps[name] = (local, calls)
      name = None
      continue
    inst = _INSTRUCTION.match(line)
    if inst is None or name is None:
      continue
    shape, rest = _split_shape(inst.group(2))
    array = _ARRAY.match(shape)
    out = [int(x) for x in array.group(1).split(",") if x] if array else None
    shapes[inst.group(1)] = out
    opcode = rest.partition("(")[0]
    if opcode in ("dot", "convolution"):
      names = re.findall(r"%([\w.\-]+)", rest.partition("(")[2].partition(")")[0])
      local += _op_flops(opcode, out, [shapes[n] for n in names], rest)
    trips = 1
    if opcode == "while":
      trip = _TRIP.search(rest)
      if trip is None:
        raise ValueError(f"A while loop without a known trip count, {inst.group(1)}: its FLOPs cannot be counted "
                         "from the HLO text.")
      trips = int(trip.group(1))
    for callee in _CALLEES.findall(rest):
      calls.append((callee, trips if f"body=%{callee}" in rest else 1))
    for group in _BRANCHES.findall(rest):
      calls.extend((c.strip().lstrip("%"), 1) for c in group.split(","))
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text: pass compiled.as_text() of a jitted function.")

  totals: dict[str, int] = {}

  def total(comp: str) -> int:
    if comp not in totals:
      own, callees = comps[comp]
      totals[comp] = own + sum(n * total(c) for c, n in callees)
    return totals[comp]

  return float(total(entry))


# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets, by the start of jax's device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,  # SXM; the PCIe card is 756e12
    "NVIDIA A100": 312e12,
}


def device_peak_flops(device: jax.Device) -> float | None:
  """The dense bfloat16 peak FLOP/s of `device`'s kind, or None where it is not known (CPUs): MFU is then not
  reported."""
  kind = getattr(device, "device_kind", "")
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None

