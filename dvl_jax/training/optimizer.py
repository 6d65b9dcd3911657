"""The optimizer: AdamW with global-norm clipping and a learning-rate schedule, and freezing by stage or by regex.

DeepSeek-VL trains in three stages (paper, Table 4), all with AdamW(b1=0.9, b2=0.95), weight decay 0 and
gradients clipped to global norm 1.0:

  stage  trains                     frozen            lr, schedule, warm-up
  S1     aligner                    SigLIP, SAM, LLM  1e-3 cosine, 128
  S2     LLM + aligner              SigLIP, SAM       3e-5 (1.3B) / 4.2e-5 (7B) step, 2000
  S3     LLM + aligner + SigLIP     SAM               2e-5 cosine, 256

  tx = make_optimizer(paper_config("S1", total_steps=15_000), params)   # params may be abstract_params(config)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)

Params are chosen by regexes over their paths, the nested dict keys joined by "/" ("aligner/linear1/kernel",
"language_model/layers_3/mlp/up_proj/kernel", "vision_model/..." for SigLIP, "high_res_vision_model/..." for
SAM); a regex must match the whole path (re.fullmatch). Each param gets a label (`param_labels`): "frozen", or
its trainable group. `optax.partition` (multi_transform) gives the frozen ones `optax.set_to_zero()`, whose
state is empty: no moment or any other array exists for a frozen param, and its update is exactly zero.

Weight decay is torch.optim.AdamW's (decoupled: p -= lr * weight_decay * p, with the scheduled lr). Params whose
path matches `no_decay` (by default biases and norm scales, every path ending in /bias or /scale) are not
decayed, as is usual for transformers (GPT-2, LLaMA recipes); the paper's recipe decays nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import optax

from dvl_jax.training import schedules

# Trainable params of each stage. SAM (high_res_vision_model/) is frozen in all of them; fullmatch keeps
# "vision_model/.*" off it.
STAGES: dict[str, tuple[str, ...]] = {
    "S1": (r"aligner/.*",),
    "S2": (r"aligner/.*", r"language_model/.*"),
    "S3": (r"aligner/.*", r"language_model/.*", r"vision_model/.*"),
}

FROZEN = "frozen"
DEFAULT_NO_DECAY = (r".*/(bias|scale)",)

# Table 4 of the paper: (learning rate, schedule, warm-up steps) per stage; S2's lr depends on the model size.
_PAPER = {"S1": (1e-3, "cosine", 128), "S2": ({"1.3b": 3e-5, "7b": 4.2e-5}, "step", 2000), "S3": (2e-5, "cosine", 256)}


def _compile(patterns: Sequence[str], field: str) -> None:
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"OptimizerConfig.{field}: {p!r} is not a valid regex ({e}).") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """What to train and how. Hashable; sequences are stored as tuples, a dict of lr multipliers as its items.

  Attributes:
    learning_rate: the peak learning rate.
    total_steps: optimizer steps in the run (the schedule's length).
    schedule: "cosine", "step" or "constant", after a linear warm-up from 0 (see schedules.py).
    warmup_steps: steps of the warm-up; step `warmup_steps` is the first at the peak.
    final_fraction: cosine only: the final lr over the peak.
    decay_at, decay_factor: step only: the lr is multiplied by decay_factor at each fraction of total_steps.
    b1, b2, eps: AdamW's moment decays and denominator epsilon (torch's defaults for eps).
    weight_decay: decoupled weight decay, as torch.optim.AdamW.
    no_decay: regexes of params never decayed (default: biases and norm scales).
    clip_norm: clip the trainable params' gradients to this global norm before AdamW; None: no clipping.
    stage: "S1", "S2" or "S3": train the params of STAGES[stage]. Give this or `trainable`, not both.
    trainable: regexes over param paths of the params to train; the others are frozen.
    lr_multipliers: (regex, multiplier) pairs (or a dict): the trainable params a regex matches get
      learning_rate * multiplier (e.g. {"vision_model/.*": 0.1} for a gentler SigLIP in S3). A param matched by
      two of them is an error.
  """

  learning_rate: float
  total_steps: int
  schedule: str = "cosine"
  warmup_steps: int = 0
  final_fraction: float = 0.0
  decay_at: tuple[float, ...] = schedules.DEFAULT_DECAY_AT
  decay_factor: float = schedules.DEFAULT_DECAY_FACTOR
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
  clip_norm: float | None = 1.0
  stage: str | None = None
  trainable: tuple[str, ...] = ()
  lr_multipliers: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    for name in ("decay_at", "no_decay", "trainable"):
      value = getattr(self, name)
      if isinstance(value, str):
        raise TypeError(f"OptimizerConfig.{name} takes a sequence, got the string {value!r}: write ({value!r},).")
      object.__setattr__(self, name, tuple(value))
    mults = self.lr_multipliers
    mults = tuple(mults.items()) if isinstance(mults, Mapping) else tuple(tuple(m) for m in mults)
    object.__setattr__(self, "lr_multipliers", mults)

    if (self.stage is None) == (not self.trainable):
      raise ValueError(f"Give OptimizerConfig either stage (one of {tuple(STAGES)}) or trainable (regexes over "
                       f"param paths), not {'both' if self.trainable else 'neither'}; got stage={self.stage!r}, "
                       f"trainable={self.trainable!r}.")
    if self.stage is not None and self.stage not in STAGES:
      raise ValueError(f"Unknown training stage {self.stage!r}; expected one of {tuple(STAGES)} (or give "
                       "trainable=regexes instead).")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"OptimizerConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}.")
    if self.eps < 0 or self.weight_decay < 0:
      raise ValueError(f"OptimizerConfig.eps and weight_decay must be >= 0, got {self.eps!r} and "
                       f"{self.weight_decay!r}.")
    if self.clip_norm is not None and not self.clip_norm > 0:
      raise ValueError(f"OptimizerConfig.clip_norm must be > 0 (or None for no clipping), got {self.clip_norm!r}.")
    for m in mults:
      if len(m) != 2 or not isinstance(m[0], str) or not m[1] > 0:
        raise ValueError(f"OptimizerConfig.lr_multipliers takes (regex, multiplier > 0) pairs, got {m!r}.")
    _compile(self.trainable, "trainable")
    _compile(self.no_decay, "no_decay")
    _compile([m[0] for m in mults], "lr_multipliers")
    self.learning_rate_fn()  # validates the schedule's values

  @property
  def trainable_patterns(self) -> tuple[str, ...]:
    """The regexes of the trainable params: the stage's, or `trainable`."""
    return STAGES[self.stage] if self.stage is not None else self.trainable

  def learning_rate_fn(self) -> optax.Schedule:
    """The schedule of the base learning rate (before any group's multiplier), e.g. for logging."""
    return schedules.make_schedule(self.schedule, self.learning_rate, self.total_steps, self.warmup_steps,
                                   final_fraction=self.final_fraction, decay_at=self.decay_at,
                                   decay_factor=self.decay_factor)


def paper_config(stage: str, *, total_steps: int, model: str = "1.3b", **overrides: Any) -> OptimizerConfig:
  """The paper's recipe for `stage` (Table 4): lr, schedule, warm-up, AdamW(0.9, 0.95), no weight decay, clip 1.0.

  Args:
    stage: "S1", "S2" or "S3".
    total_steps: optimizer steps of the run.
    model: "1.3b" or "7b" (only S2's learning rate differs).
    **overrides: any other OptimizerConfig field, e.g. lr_multipliers.
  """
  if stage not in _PAPER:
    raise ValueError(f"Unknown training stage {stage!r}; expected one of {tuple(_PAPER)}.")
  lr, schedule, warmup = _PAPER[stage]
  if isinstance(lr, dict):
    if model not in lr:
      raise ValueError(f"Unknown model size {model!r} for the paper's {stage} learning rate; expected one of "
                       f"{tuple(lr)}.")
    lr = lr[model]
  fields = dict(learning_rate=lr, schedule=schedule, warmup_steps=warmup, total_steps=total_steps, stage=stage)
  fields.update(overrides)
  return OptimizerConfig(**fields)


def _paths(params: Any) -> tuple[list[str], Any]:
  """The params' paths ("aligner/linear1/kernel") in leaf order, and the tree structure."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves], treedef


def _prefixes(paths: Sequence[str]) -> str:
  """The distinct first two levels of `paths`, layer indices folded ("language_model/layers_*")."""
  heads = {"/".join(re.sub(r"_\d+$", "_*", c) for c in p.split("/")[:2]) for p in paths}
  return ", ".join(sorted(heads))


def _matches(pattern: str, paths: Sequence[str]) -> list[int]:
  rx = re.compile(pattern)
  return [i for i, p in enumerate(paths) if rx.fullmatch(p)]


def param_labels(params: Any, config: OptimizerConfig) -> Any:
  """Each param's optimizer group, as a tree of strings shaped like `params`.

  Labels: "frozen"; "trainable" (the base lr) or "group{i}" (lr * config.lr_multipliers[i][1]); with weight
  decay on, "_no_decay" is appended for params that `config.no_decay` matches.

  Args:
    params: the param tree (arrays or ShapeDtypeStructs, e.g. dvl_jax.abstract_params(model_config)).
    config: the OptimizerConfig.
  Raises:
    ValueError: a trainable or lr-multiplier regex that matches no (trainable) param, or a param that two
      lr-multiplier regexes match. The messages list the param path prefixes.
  """
  paths, treedef = _paths(params)
  trainable = set()
  for pattern in config.trainable_patterns:
    hits = _matches(pattern, paths)
    if not hits:
      raise ValueError(f"The trainable regex {pattern!r} matches no param; it must match whole paths, which start "
                       f"with: {_prefixes(paths)}.")
    trainable.update(hits)

  labels = [("trainable" if i in trainable else FROZEN) for i in range(len(paths))]
  owner: dict[int, str] = {}
  for g, (pattern, _) in enumerate(config.lr_multipliers):
    hits = _matches(pattern, paths)
    live = [i for i in hits if i in trainable]
    if not live:
      why = "only frozen params" if hits else "no param"
      raise ValueError(f"The lr_multipliers regex {pattern!r} matches {why}; it must match whole paths of "
                       f"trainable params, which start with: {_prefixes([paths[i] for i in sorted(trainable)])}.")
    for i in live:
      if i in owner:
        raise ValueError(f"The param {paths[i]!r} is matched by two lr_multipliers regexes, {owner[i]!r} and "
                         f"{pattern!r}: make them disjoint.")
      owner[i] = pattern
      labels[i] = f"group{g}"

  if config.weight_decay > 0:
    for pattern in config.no_decay:
      for i in _matches(pattern, paths):
        if labels[i] != FROZEN and not labels[i].endswith("_no_decay"):
          labels[i] += "_no_decay"
  return jax.tree_util.tree_unflatten(treedef, labels)


def trainable_mask(params: Any, config: OptimizerConfig) -> Any:
  """A tree of bools shaped like `params`: True where the param is trained."""
  return jax.tree.map(lambda label: label != FROZEN, param_labels(params, config))


def _group_transform(config: OptimizerConfig, label: str) -> optax.GradientTransformation:
  """AdamW for one trainable group, its lr the base schedule times the group's multiplier."""
  base = config.learning_rate_fn()
  group = label.removesuffix("_no_decay")
  mult = 1.0 if group == "trainable" else config.lr_multipliers[int(group.removeprefix("group"))][1]
  lr = base if mult == 1.0 else (lambda count: base(count) * mult)
  wd = 0.0 if label.endswith("_no_decay") else config.weight_decay
  return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=wd)


def make_optimizer(config: OptimizerConfig, params: Any) -> optax.GradientTransformation:
  """The optimizer for `params` (arrays or abstract_params): clip, then AdamW on trainable groups, zero on frozen.

  The global norm is taken over the trainable params' gradients only (the frozen ones' never count), as
  torch.nn.utils.clip_grad_norm_ over the params given to torch.optim.AdamW. Frozen params carry no optimizer
  state and get zero updates. `update` needs `params` (for weight decay).

  Raises:
    ValueError: see `param_labels`.
  """
  labels = param_labels(params, config)
  groups = sorted(set(jax.tree.leaves(labels)))
  transforms = {label: (optax.set_to_zero() if label == FROZEN else _group_transform(config, label))
                for label in groups}
  tx = optax.partition(transforms, labels)
  if config.clip_norm is None:
    return tx
  mask = jax.tree.map(lambda label: label != FROZEN, labels)
  # optax.masked hands the inner transform MaskedNodes (no leaves) for the frozen params: the norm skips them.
  return optax.chain(optax.masked(optax.clip_by_global_norm(config.clip_norm), mask), tx)
