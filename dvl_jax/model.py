"""The user-facing model: a config, its params and jitted entry points. `load()` restores a converted checkpoint.

  model = dvl_jax.load("ckpt/deepseek-vl-1.3b-chat")
  logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # [B, T, V]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax import checkpoint, generate
from dvl_jax.config import ModelConfig
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.sampling import SamplingConfig


def _dummy_inputs(config: ModelConfig) -> tuple[jax.Array, ...]:
  s = config.vision.image_size
  ids = jnp.zeros((1, 1), jnp.int32)
  high = None
  if config.is_hybrid:
    high = jnp.zeros((1, 1, config.high_res.image_size, config.high_res.image_size, 3), jnp.float32)
  return ids, jnp.ones((1, 1), jnp.int32), ids, jnp.zeros((1, 1, s, s, 3), jnp.float32), high


def abstract_params(config: ModelConfig) -> Any:
  """The params' ShapeDtypeStructs, with no memory allocated (jax.eval_shape of init)."""
  module = DeepseekVL(config)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *_dummy_inputs(config))["params"])
  return nn.meta.unbox(boxed)


def init_params(config: ModelConfig, seed: int = 0) -> Any:
  """Random params (normal(0.02) weights, unit norms), as a plain nested dict of arrays."""
  module = DeepseekVL(config)
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), *_dummy_inputs(config))["params"])


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions of a (left-)padded batch, as transformers' generate: cumsum(mask) - 1, 1 at padding."""
  pos = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
  return jnp.where(attention_mask == 0, 1, pos)


def _concrete(x: Any) -> np.ndarray | None:
  """The value of x as numpy when it is known on the host (not a tracer), else None."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


@dataclasses.dataclass
class GenerationOutput:
  """tokens: int32 [B, max_new_tokens], each row's new tokens then `pad_token_id`; lengths: int32 [B], the new
  tokens per row (its EOS included)."""

  tokens: np.ndarray
  lengths: np.ndarray


class Model:
  """A DeepSeek-VL model with its params.

  Attributes:
    config: the ModelConfig.
    params: plain nested dict of arrays, as `DeepseekVL(config).init` lays them out.
    module: the Flax module.
    generation_defaults: eos_token_id / pad_token_id from the checkpoint's generation_config.json, if any.
  """

  def __init__(self, config: ModelConfig, params: Any, generation_defaults: dict[str, Any] | None = None):
    self.config = config
    self.params = params
    self.module = DeepseekVL(config)
    self.generation_defaults = dict(generation_defaults or {})
    self._forward = jax.jit(self.module.apply, donate_argnames=("cache",))
    gen_static = ("pad_id", "sampling")
    self._prefill = jax.jit(functools.partial(generate.prefill, self.module), donate_argnames=("cache",),
                            static_argnames=(*gen_static, "max_new_tokens"))
    self._decode = jax.jit(functools.partial(generate.decode, self.module), donate_argnames=("state",),
                           static_argnames=gen_static)
    self._decode_step = jax.jit(functools.partial(generate.decode_step, self.module), donate_argnames=("state",),
                                static_argnames=gen_static)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache for `batch_size` rows and `max_len` slots, in the compute dtype."""
    return KVCache.init(self.config.text, batch_size, max_len, jnp.dtype(self.config.dtype))

  def check_inputs(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                   high_res_pixel_values: Any = None, image_mask: Any = None) -> None:
    """Raises a ValueError that names the problem when the inputs do not fit the model."""
    cfg = self.config
    shape = np.shape(input_ids)
    if len(shape) != 2:
      raise ValueError(f"input_ids must be [batch, seq_len]; got shape {shape}.")
    if attention_mask is not None and np.shape(attention_mask) != shape:
      raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from input_ids shape {shape}.")
    if pixel_values is not None:
      s = cfg.vision.image_size
      ps = np.shape(pixel_values)
      if len(ps) != 5 or ps[0] != shape[0] or ps[2:] != (s, s, 3):
        raise ValueError(f"pixel_values must be [batch={shape[0]}, num_images, {s}, {s}, 3] (channels-last, "
                         f"one slot per image of the row); got shape {ps}.")
      if cfg.is_hybrid:
        s = cfg.high_res.image_size
        hs = np.shape(high_res_pixel_values) if high_res_pixel_values is not None else None
        if hs != (*ps[:2], s, s, 3):
          raise ValueError(f"The hybrid model takes high_res_pixel_values [{ps[0]}, {ps[1]}, {s}, {s}, 3] beside "
                           f"pixel_values {ps} (the same images at {s} px, for the SAM tower); got "
                           f"{'none' if hs is None else f'shape {hs}'}.")
    if high_res_pixel_values is not None and not cfg.is_hybrid:
      raise ValueError("high_res_pixel_values was given, but this model has no high-resolution (SAM) tower.")
    ids = _concrete(input_ids)
    if ids is None:
      return
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= cfg.text.vocab_size:
      raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}); got values from {ids.min()} to "
                       f"{ids.max()}.")
    per_image = cfg.tokens_per_image
    counts = (ids == cfg.image_token_id).sum(axis=1)
    slots = 0 if pixel_values is None else np.shape(pixel_values)[1]
    images = None if image_mask is None or pixel_values is None else np.asarray(image_mask).sum(axis=1)
    for row, count in enumerate(counts):
      if images is not None and count != images[row] * per_image:
        raise ValueError(
            f"Row {row} of input_ids has {count} image tokens (id {cfg.image_token_id}) but image_mask marks "
            f"{images[row]} image(s) of {per_image} tokens each, {images[row] * per_image} tokens.")
      if count % per_image or count // per_image > slots:
        raise ValueError(
            f"Row {row} of input_ids has {count} image tokens (id {cfg.image_token_id}), but each image takes "
            f"{per_image} tokens and pixel_values has {slots} image slot(s) per row: expected a multiple of "
            f"{per_image} up to {slots * per_image}. Expand each image placeholder to {per_image} tokens and "
            "pass one image per placeholder.")

  def forward(self, input_ids, attention_mask=None, pixel_values=None, positions=None,
              cache: KVCache | None = None, high_res_pixel_values=None,
              image_mask=None) -> tuple[jax.Array, KVCache | None]:
    """Logits and the updated cache. With a cache, the tokens are appended at `cache.end` (prefill or decode);
    positions then default to continue each row's count of real tokens. The cache is donated."""
    self.check_inputs(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if positions is None:
      positions = positions_from_mask(mask)
      if cache is not None:
        positions = positions + cache.next_positions()[:, None]
    dtype = jnp.dtype(self.config.dtype)
    if pixel_values is not None:
      pixel_values = jnp.asarray(pixel_values, dtype)
      if high_res_pixel_values is not None:
        high_res_pixel_values = jnp.asarray(high_res_pixel_values, dtype)
    else:
      high_res_pixel_values = None
    return self._forward({"params": self.params}, input_ids, mask, positions, pixel_values, high_res_pixel_values,
                         cache)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None,
               high_res_pixel_values=None, image_mask=None) -> jax.Array:
    """Logits [B, T, V] of a forward pass without cache.

    Args:
      input_ids: int [B, T]; each image is `config.tokens_per_image` image tokens.
      attention_mask: [B, T], 1 for real tokens, 0 for (left) padding; default all ones.
      pixel_values: float [B, N, S, S, 3], normalised, channels-last; N is the most images in any row, and
        a row with fewer images leaves its extra slots zero.
      position_ids: int [B, T]; default from the attention mask (cumsum - 1), as transformers' generate.
      high_res_pixel_values: hybrid model only: float [B, N, S', S', 3], the same images at the SAM tower's
        resolution (1024), normalised with the CLIP mean and std.
      image_mask: optional bool [B, N], the slots that hold an image (the Processor returns it); when given,
        each row's image-token count must match it exactly.
    """
    return self.forward(input_ids, attention_mask, pixel_values, position_ids,
                        high_res_pixel_values=high_res_pixel_values, image_mask=image_mask)[0]


  # ----- generation -----
  def _start(self, input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask, max_new_tokens,
             sampling, eos_token_id, pad_token_id, seed):
    """Validates, pads the prompt to its length bucket, prefills. Returns (state, eos ids, pad id)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    self.check_inputs(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask)
    eos = eos_token_id if eos_token_id is not None else self.generation_defaults.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else self.generation_defaults.get("pad_token_id")
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    b, t = ids.shape
    bucket = generate.bucket_length(t)
    if bucket + max_new_tokens > self.config.text.max_position_embeddings:
      raise ValueError(f"The prompt ({t} tokens, padded to {bucket}) plus max_new_tokens={max_new_tokens} exceeds the "
                       f"model's {self.config.text.max_position_embeddings} positions.")
    extra = bucket - t  # left padding: masked out, never attended, not counted by the repetition penalty
    penalised = np.concatenate([np.full((b, extra), -1, np.int32), ids], axis=1)
    ids = np.concatenate([np.full((b, extra), pad, np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((b, extra), np.int32), mask], axis=1)
    dtype = jnp.dtype(self.config.dtype)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values, dtype)
    high = None if pixels is None or high_res_pixel_values is None else jnp.asarray(high_res_pixel_values, dtype)
    state = self._prefill(self.params, jnp.asarray(ids), jnp.asarray(mask), positions_from_mask(jnp.asarray(mask)),
                          pixels, high, self.init_cache(b, bucket + max_new_tokens), jax.random.key(seed),
                          jnp.asarray(eos_ids, jnp.int32), jnp.asarray(penalised), pad_id=int(pad),
                          max_new_tokens=int(max_new_tokens), sampling=sampling)
    return state, jnp.asarray(eos_ids, jnp.int32), int(pad)

  def generate(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None, image_mask=None,
               *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None, seed: int = 0) -> GenerationOutput:
    """Generates up to `max_new_tokens` per row; `model.generate(**processor_output, ...)` works.

    Greedy by default; do_sample=True samples with temperature, top_k (0: off) and top_p (1.0: off).
    repetition_penalty (1.0: off) applies to every token already in the row, prompt included. A row stops at any
    of `eos_token_id` (default: the checkpoint's generation_config.json); the whole loop stops when all rows have.
    The same seed gives the same samples.
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
    state, eos_ids, pad = self._start(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask,
                                      max_new_tokens, sampling, eos_token_id, pad_token_id, seed)
    state = self._decode(self.params, state, eos_ids, pad_id=pad, sampling=sampling)
    return GenerationOutput(tokens=np.asarray(state.tokens), lengths=np.asarray(state.lengths))

  def stream(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None, image_mask=None,
             **kwargs) -> Iterator[np.ndarray]:
    """Like generate, but yields each step's tokens int32 [B] as they are produced (rows that have stopped
    yield the pad id). Steps from Python: for interactive use, not throughput."""
    max_new_tokens = kwargs.pop("max_new_tokens", 64)
    seed, eos_token_id, pad_token_id = kwargs.pop("seed", 0), kwargs.pop("eos_token_id", None), kwargs.pop(
        "pad_token_id", None)
    sampling = SamplingConfig(**kwargs)
    state, eos_ids, pad = self._start(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask,
                                      max_new_tokens, sampling, eos_token_id, pad_token_id, seed)
    for step in range(max_new_tokens):
      if step:
        state = self._decode_step(self.params, state, eos_ids, pad_id=pad, sampling=sampling)
      yield np.asarray(state.tokens[:, step])
      if bool(state.done.all()):
        return


def load(path: str | os.PathLike, *, dtype: str | None = None) -> Model:
  """Restores a checkpoint written by convert/torch_to_orbax.py.

  Args:
    path: the checkpoint directory.
    dtype: "float32" | "bfloat16" | "float16" for both params and compute; default the checkpoint's.
  """
  config = checkpoint.read_config(path)
  if dtype is not None:
    config = config.replace(dtype=dtype, param_dtype=dtype)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params(config))
  generation = {}
  gen_file = os.path.join(os.fspath(path), "generation_config.json")
  if os.path.isfile(gen_file):
    with open(gen_file) as f:
      raw = json.load(f)
    generation = {k: raw[k] for k in ("eos_token_id", "pad_token_id") if raw.get(k) is not None}
  return Model(config, checkpoint.restore_params(path, target), generation)
