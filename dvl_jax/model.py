"""The user-facing model: a config, its params and jitted entry points. `load()` restores a converted checkpoint.

  model = dvl_jax.load("ckpt/deepseek-vl-1.3b-chat")
  logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # [B, T, V]
  out = model.generate(**processor_output, max_new_tokens=64)

In this file: the params' shapes and shardings without memory (`abstract_params`, `param_shardings`,
`state_shardings`) and random params (`init_params`); `Model`, which puts the host inputs where the plan wants
them (the checks are dvl_jax/inputs.py, the placement ShardingPlan.place) and calls the jitted forward, prefill
and decode (dvl_jax/generate.py, which also holds the defaults of a generation call); `load`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax import checkpoint, generate
from dvl_jax.config import ModelConfig
from dvl_jax.generate import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, GenerationOutput, positions_from_mask
from dvl_jax.inputs import check_inputs
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.nn.output import Output
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.sampling import SamplingConfig
from dvl_jax.sharding import ShardingPlan


# ----- params: shapes and shardings without memory, random init, the plan's layout -----
def _dummy_inputs(config: ModelConfig) -> tuple[jax.Array, ...]:
  s = config.vision.image_size
  ids = jnp.zeros((1, 1), jnp.int32)
  high = None
  if config.is_hybrid:
    high = jnp.zeros((1, 1, config.high_res.image_size, config.high_res.image_size, 3), jnp.float32)
  return ids, jnp.ones((1, 1), jnp.int32), ids, jnp.zeros((1, 1, s, s, 3), jnp.float32), high


@functools.lru_cache(maxsize=8)
def _boxed_abstract_params(config: ModelConfig, padded_vocab_size: int | None = None) -> Any:
  """The params' ShapeDtypeStructs boxed with their logical axis names (nn.Partitioned)."""
  module = DeepseekVL(config, padded_vocab_size)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *_dummy_inputs(config))["params"])


def _vocab_rows(config: ModelConfig, plan: ShardingPlan) -> int | None:
  """The decoder's vocabulary rows under `plan` (ShardingPlan.padded_vocab_size), None where it pads none."""
  rows = plan.padded_vocab_size(config.text.vocab_size)
  return None if rows == config.text.vocab_size else rows


def param_shardings(config: ModelConfig, plan: ShardingPlan) -> Any:
  """Where each param of a `Model` lives under `plan` (its vocabulary rows padded, if the plan pads them): a
  tree of NamedShardings, checked against the mesh."""
  return plan.param_shardings(_boxed_abstract_params(config, _vocab_rows(config, plan)))


def state_shardings(config: ModelConfig, plan: ShardingPlan, state: Any) -> Any:
  """Where each array of a state made from a `Model`'s params lives under `plan` (ShardingPlan.state_shardings):
  an optax state's moments as their params, step counts replicated; e.g. for
  `jax.jit(tx.init, out_shardings=state_shardings(config, plan, jax.eval_shape(tx.init, params)))`."""
  return plan.state_shardings(_boxed_abstract_params(config, _vocab_rows(config, plan)), state)


def abstract_params(config: ModelConfig, plan: ShardingPlan | None = None, *, padded: bool = False) -> Any:
  """The params' ShapeDtypeStructs at the checkpoint's shapes (the real vocabulary), with no memory allocated
  (jax.eval_shape of init); with a plan, each carries its sharding (a restore target): its sharding in the
  model, except a vocabulary the plan pads, whose rows are kept whole until `Model` pads them.

  padded: with a plan, the shapes and shardings a `Model` under that plan holds instead (`Model.params`: the
    vocabulary's rows padded as the plan pads them); the layout of a train state made from them."""
  if padded and plan is not None:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(_boxed_abstract_params(config, _vocab_rows(config, plan))),
                        param_shardings(config, plan))
  shapes = nn.meta.unbox(_boxed_abstract_params(config))
  if plan is None:
    return shapes
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.unpadded(s, x.shape)),
                      shapes, param_shardings(config, plan))


def init_params(config: ModelConfig, seed: int = 0, plan: ShardingPlan | None = None) -> Any:
  """Random params (normal(0.02) weights, unit norms) at the checkpoint's shapes, as a plain nested dict of
  arrays; with a plan, each created directly in its shards (no device holds more than its part), as
  `abstract_params(config, plan)` lays them out."""
  module = DeepseekVL(config)

  def init():
    return nn.meta.unbox(module.init(jax.random.key(seed), *_dummy_inputs(config))["params"])

  shardings = None if plan is None else jax.tree.map(lambda x: x.sharding, abstract_params(config, plan))
  return jax.jit(init, out_shardings=shardings)()


def _in_layout(config: ModelConfig, plan: ShardingPlan, params: Any) -> Any:
  """Params at the checkpoint's shapes, or already padded for `plan` -> in their shards under `plan`, the
  vocabulary's rows zero-padded where the plan pads them."""
  shardings = param_shardings(config, plan)
  rows = _vocab_rows(config, plan)
  if rows is None:
    return jax.device_put(params, shardings)

  def one(path, x, real, padded, sharding):
    if tuple(x.shape) == padded.shape:
      return jax.device_put(x, sharding)
    if tuple(x.shape) != real.shape:
      raise ValueError(f"Param {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}; the config wants "
                       f"{real.shape} ({padded.shape} padded for {plan}).")
    return _zero_padder(padded.shape, sharding)(x)

  return jax.tree_util.tree_map_with_path(one, params, abstract_params(config),
                                          nn.meta.unbox(_boxed_abstract_params(config, rows)), shardings)


@functools.lru_cache(maxsize=16)
def _zero_padder(shape: tuple[int, ...], sharding: Any) -> Any:
  """A jitted function that pads an array with zeros at the end of each dimension to `shape`, in `sharding`."""
  return jax.jit(lambda x: jnp.pad(x, [(0, s - n) for n, s in zip(x.shape, shape)]), out_shardings=sharding)


# ----- the model -----
class Model:
  """A DeepSeek-VL model with its params.

  Attributes:
    config: the ModelConfig.
    params: plain nested dict of arrays, as `module.init` lays them out, in their shards under `plan`. Where
      the plan pads the vocabulary (ShardingPlan.padded_vocab_size), the embedding's and lm_head's rows from
      `config.text.vocab_size` on are zeros: cut them (`[:config.text.vocab_size]`) before saving a checkpoint.
      The constructor takes params at the checkpoint's shapes (or padded so) and pads them.
    module: the Flax module (DeepseekVL, with the plan's padded vocabulary).
    plan: the ShardingPlan.
    generation_config: the EOS and pad ids `generate` defaults to (the checkpoint's generation_config.json).
  """

  def __init__(self, config: ModelConfig, params: Any,
               generation_config: GenerationConfig | dict[str, Any] | None = None, plan: ShardingPlan | None = None):
    self.config = config
    self.plan = plan or ShardingPlan.single_device()
    # A no-op for params already in their shards (load, init_params with the plan); otherwise they move there.
    self.params = _in_layout(config, self.plan, params)
    self.module = DeepseekVL(config, _vocab_rows(config, self.plan))
    if not isinstance(generation_config, GenerationConfig):  # a dict of eos_token_id / pad_token_id, or None
      generation_config = GenerationConfig(**(generation_config or {}))
    self.generation_config = generation_config
    # Jitted under the plan: activations inside are laid out by its rules (ShardingPlan.jit).
    jit = self.plan.jit
    self._forward = jit(self.module.apply, donate_argnames=("cache",))
    self._init_cache = jit(KVCache.init, static_argnums=(0, 1, 2, 3))
    gen_static = ("pad_id", "sampling")
    self._prefill = jit(functools.partial(generate.prefill, self.module), donate_argnames=("cache",),
                        static_argnames=(*gen_static, "max_new_tokens"))
    self._decode = jit(functools.partial(generate.decode, self.module), donate_argnames=("state",),
                       static_argnames=gen_static)
    self._decode_step = jit(functools.partial(generate.decode_step, self.module), donate_argnames=("state",),
                            static_argnames=gen_static)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Model:
    """`load(path, **kwargs)` under transformers' name: a converted checkpoint directory, not a Hub id."""
    return load(path, **kwargs)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache for `batch_size` rows (global) and `max_len` slots, in the compute dtype, sharded as
    the plan lays out k and v (batch over the batch axes, kv heads over tensor)."""
    return self._init_cache(self.config.text, batch_size, max_len, jnp.dtype(self.config.dtype))

  def check_inputs(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                   high_res_pixel_values: Any = None, image_mask: Any = None) -> None:
    """Raises a ValueError that names the problem when the inputs do not fit the model (inputs.check_inputs)."""
    check_inputs(self.config, input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask)

  # ----- inputs and outputs across devices and processes -----
  def _place(self, input_ids, attention_mask, pixel_values, high_res_pixel_values, positions=None, *,
             bucket: bool = False, pad_id: int = 0, exact: bool = False) -> dict[str, Any]:
    """This process's host inputs -> global arrays laid out by the plan.

    Rows are padded (with copies of the last row, whose outputs are dropped) to a multiple of the plan's batch
    shards and, across processes, to the same count; prompts are left-padded (masked out, which changes no
    real token's output) to the longest of any process, or to its length bucket; image slots are padded with
    zero slots that no image token reads. `exact` refuses any padding (a caller-made cache fixes the shapes).
    """
    cfg = self.config
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    b, t = ids.shape
    n = 0 if pixel_values is None else np.shape(pixel_values)[1]
    rows, t_max, n_max = self.plan.agree_batch(b, t, n)
    length = generate.bucket_length(t_max) if bucket else t_max
    if exact and (rows, length) != (b, t):
      raise ValueError(f"With a cache, the batch must need no padding: {b} rows of {t} tokens here, but the plan "
                       f"({self.plan}) and the other processes need {rows} rows of {length} tokens.")

    def pad(x: np.ndarray, value, to: int = length, left: bool = True) -> np.ndarray:
      """Pads axis 1 to `to` (on the left, or the right); `place` pads the rows."""
      widths = [(0, 0)] * x.ndim
      widths[1] = (to - x.shape[1], 0) if left else (0, to - x.shape[1])
      return np.pad(x, widths, constant_values=value)

    out = {"input_ids": pad(ids, pad_id), "attention_mask": pad(mask, 0)}
    if bucket:  # generation: prefill derives the positions; the repetition penalty skips our padding
      out["penalised_ids"] = pad(ids, -1)
    else:
      out["positions"] = pad(np.asarray(positions, np.int32), 1) if positions is not None else np.asarray(
          positions_from_mask(out["attention_mask"]))
    dtype = jnp.dtype(cfg.dtype)
    out["pixel_values"] = out["high_res_pixel_values"] = None
    if n_max:
      towers = [("pixel_values", pixel_values, cfg.vision.image_size)]
      if cfg.is_hybrid:
        towers.append(("high_res_pixel_values", high_res_pixel_values, cfg.high_res.image_size))
      for key, value, size in towers:
        value = np.zeros((b, 0, size, size, 3), dtype) if value is None else np.asarray(value, dtype)
        out[key] = pad(value, 0, to=n_max, left=False)
    return self.plan.place(out, rows=rows)

  def _rows(self, x: jax.Array, b: int) -> jax.Array | np.ndarray:
    """This process's first `b` rows of a global batch-major array: a jax.Array in a single process, numpy
    (the rows this process fed) with several."""
    if not self.plan.multi_process:
      return x if x.shape[0] == b else x[:b]
    return self.plan.local_rows(x)[:b]

  def forward(self, input_ids, attention_mask=None, pixel_values=None, positions=None,
              cache: KVCache | None = None, high_res_pixel_values=None,
              image_mask=None) -> Output:
    """Output(logits [B, T, V], the updated cache or None). With a cache, the tokens are appended at
    `cache.end` (prefill or decode); positions then default to continue each row's count of real tokens. The
    cache is donated."""
    self.check_inputs(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask)
    b, t = np.shape(input_ids)
    x = self._place(input_ids, attention_mask, pixel_values, high_res_pixel_values, positions, exact=cache is not None)
    if cache is not None and positions is None:  # continue each row's count of real tokens
      x["positions"] = x["positions"] + cache.next_positions()[:, None]
    out = self._forward({"params": self.params}, x["input_ids"], x["attention_mask"], x["positions"],
                        x["pixel_values"], x["high_res_pixel_values"], cache)
    logits = self._rows(out.logits, b)
    if logits.shape[-1] != self.config.text.vocab_size:  # the ids the plan pads the vocabulary with
      logits = logits[..., :self.config.text.vocab_size]
    return Output(logits=logits if logits.shape[1] == t else logits[:, -t:], cache=out.cache)

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
                        high_res_pixel_values=high_res_pixel_values, image_mask=image_mask).logits

  # ----- generation -----
  def _start(self, input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask, max_new_tokens,
             sampling, eos_token_id, pad_token_id, seed):
    """Validates, pads the prompt to its length bucket, prefills. Returns (state, eos ids, pad id)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    self.check_inputs(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask)
    ids = self.generation_config.override(eos_token_id, pad_token_id)
    eos_ids, pad = ids.eos_ids, ids.pad_id
    x = self._place(input_ids, attention_mask, pixel_values, high_res_pixel_values, bucket=True, pad_id=pad)
    rows, bucket = x["input_ids"].shape
    if bucket + max_new_tokens > self.config.text.max_position_embeddings:
      raise ValueError(f"The prompt ({np.shape(input_ids)[1]} tokens, padded to {bucket}) plus max_new_tokens="
                       f"{max_new_tokens} exceeds the model's {self.config.text.max_position_embeddings} positions.")
    state = self._prefill(self.params, x["input_ids"], x["attention_mask"], x["pixel_values"],
                          x["high_res_pixel_values"], self.init_cache(rows, bucket + max_new_tokens), np.int32(seed),
                          eos_ids, x["penalised_ids"], pad_id=pad, max_new_tokens=int(max_new_tokens),
                          sampling=sampling)
    return state, eos_ids, pad

  def generate(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None, image_mask=None,
               *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
               seed: int = 0) -> GenerationOutput:
    """Generates up to `max_new_tokens` per row; `model.generate(**processor_output, ...)` works.

    Greedy by default; do_sample=True samples with temperature, top_k (0: off) and top_p (1.0: off).
    repetition_penalty (1.0: off) applies to every token already in the row, prompt included. A row stops at any
    of `eos_token_id` (default: `generation_config`, the checkpoint's); the whole loop stops when all rows have.
    The same seed gives the same samples.

    With several processes, every process calls generate together, each with its own rows (any count, any
    prompt length: they are padded to agree), and gets back its own rows' tokens.
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
    state, eos_ids, pad = self._start(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask,
                                      max_new_tokens, sampling, eos_token_id, pad_token_id, seed)
    state = self._decode(self.params, state, eos_ids, pad_id=pad, sampling=sampling)
    b = np.shape(input_ids)[0]
    return GenerationOutput(tokens=np.asarray(self._rows(state.tokens, b)),
                            lengths=np.asarray(self._rows(state.lengths, b)))

  def stream(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None, image_mask=None,
             *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, **sampling: Any) -> Iterator[np.ndarray]:
    """Like generate, but yields each step's tokens int32 [B] as they are produced (rows that have stopped
    yield the pad id). Steps from Python: for interactive use, not throughput. `sampling`: do_sample,
    temperature, top_k, top_p, repetition_penalty, as generate takes them."""
    sampling = SamplingConfig(**sampling)
    state, eos_ids, pad = self._start(input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask,
                                      max_new_tokens, sampling, eos_token_id, pad_token_id, seed)
    b = np.shape(input_ids)[0]
    for step in range(max_new_tokens):
      if step:
        state = self._decode_step(self.params, state, eos_ids, pad_id=pad, sampling=sampling)
      yield np.asarray(self._rows(state.tokens, b))[:, step]
      if bool(state.done.all()):
        return


# ----- loading -----
def load(path: str | os.PathLike, *, dtype: str | None = None, mesh: Any = None, strategy: Any = None,
         vision_strategy: Any = None, attention: str | None = None) -> Model:
  """Restores a checkpoint written by convert/torch_to_orbax.py, each param straight into its shards.

  Args:
    path: the checkpoint directory.
    dtype: "float32" | "bfloat16" | "float16" for both params and compute; default the checkpoint's.
    mesh: where the model runs: None (the first device), a ShardingPlan, a jax Mesh with axes ("data", "fsdp",
      "tensor"), or a mesh spec ("data=2,tensor=4", {"fsdp": -1}, MeshSpec) over every device of every process.
    strategy, vision_strategy: the sharding strategies of the decoder and of the image towers (see
      dvl_jax.sharding); default from the mesh. Ignored when `mesh` is a ShardingPlan.
    attention: the attention implementation of every tower, one of config.ATTENTION_IMPLS; default the
      checkpoint's ("auto": by backend).
  """
  config = checkpoint.read_config(path)
  if dtype is not None:
    config = config.replace(dtype=dtype, param_dtype=dtype)
  if attention is not None:
    config = config.with_attention(attention)
  plan = make_plan(mesh, strategy, vision_strategy)
  return Model(config, checkpoint.restore_params(path, abstract_params(config, plan)), GenerationConfig.read(path),
               plan)


def make_plan(mesh: Any = None, strategy: Any = None, vision_strategy: Any = None) -> ShardingPlan:
  """A ShardingPlan from `load`'s arguments: None is the first device alone."""
  if isinstance(mesh, ShardingPlan):
    return mesh
  if mesh is None and strategy is None and vision_strategy is None:
    return ShardingPlan.single_device()
  return ShardingPlan(mesh, strategy, vision_strategy)
