"""Autoregressive generation over the static KV cache: one prefill call, then one jitted `lax.while_loop`.

prefill: encodes the images, fills the cache with the (left-padded, length-bucketed) prompt and samples the
  first token. decode: each step feeds the last token of every row at the next cache slot, samples, and
  stops a row at its EOS; the loop exits when every row has stopped or `max_new_tokens` is reached. The cache
  is donated to both calls, so it is updated in place. Positions continue each row's count of real tokens, as
  transformers' generate derives them from the attention mask.

On the host, the one place that `Model.generate` and the captioner (dvl_jax/captioning/runner.py) both read:
the defaults of a call (`GenerationConfig`: EOS and pad ids, `DEFAULT_MAX_NEW_TOKENS`), the prompt-length
buckets (`bucket_length`) and what a call returns (`GenerationOutput`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.sampling import SamplingConfig, next_tokens
from dvl_jax.sharding import constrain


@flax.struct.dataclass
class DecodeState:
  """Attributes:
    cache: the KV cache.
    tokens: int32 [B, M], the new tokens so far; `pad_id` after a row's end and beyond `step`.
    step: int32 [], how many tokens have been produced.
    done: bool [B], rows that produced an EOS.
    lengths: int32 [B], new tokens per row, its EOS included.
    seen: bool [B, V] tokens in each sequence (prompt included), for the repetition penalty; [B, 1] if unused.
      V is the logits' width: the plan's padded vocabulary, whose padded ids are never seen.
    rng: the PRNG key.
  """

  cache: KVCache
  tokens: jax.Array
  step: jax.Array
  done: jax.Array
  lengths: jax.Array
  seen: jax.Array
  rng: jax.Array


def _mark(seen: jax.Array, tokens: jax.Array) -> jax.Array:
  """seen [B, V] with seen[b, tokens[b, ...]] set; ids outside [0, V) (the bucket padding) are ignored."""
  if seen.shape[1] == 1:
    return seen
  rows = jnp.arange(seen.shape[0])[:, None]
  return seen.at[rows, tokens.reshape(tokens.shape[0], -1)].set(True, mode="drop")


def _record(state: DecodeState, logits: jax.Array, cache: KVCache, eos_ids: jax.Array, pad_id: int,
            sampling: SamplingConfig) -> DecodeState:
  """Samples from logits [B, V], appends the token at `state.step` and updates the stop flags."""
  rng, key = jax.random.split(state.rng)
  token = next_tokens(logits, state.seen, key, sampling)
  token = jnp.where(state.done, pad_id, token)
  tokens = constrain(jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)), ("batch", None))
  lengths = constrain(state.lengths + (~state.done).astype(jnp.int32), ("batch",))
  done = constrain(state.done | jnp.isin(token, eos_ids), ("batch",))
  return DecodeState(cache=cache, tokens=tokens, step=state.step + 1, done=done, lengths=lengths,
                     seen=constrain(_mark(state.seen, token[:, None]), ("batch", None)), rng=rng)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions of a (left-)padded batch, as transformers' generate: cumsum(mask) - 1, 1 at padding."""
  pos = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
  return jnp.where(attention_mask == 0, 1, pos)


def prefill(module: nn.Module, params, input_ids: jax.Array, attention_mask: jax.Array,
            pixel_values: jax.Array | None, high_res_pixel_values: jax.Array | None, cache: KVCache, seed: jax.Array,
            eos_ids: jax.Array, penalised_ids: jax.Array, *, pad_id: int, max_new_tokens: int,
            sampling: SamplingConfig) -> DecodeState:
  """Runs the prompt [B, T] through the model into the cache and samples the first new token.

  seed: int [], the sampling PRNG's seed (a host value: the key is made on the devices, as every input of a
  multi-process program must be a host value or a global array).
  penalised_ids: int [B, T], the prompt tokens the repetition penalty counts (transformers counts the caller's
  padding too, not ours: the bucket padding is marked -1).
  """
  positions = positions_from_mask(attention_mask)
  out = module.apply({"params": params}, input_ids, attention_mask, positions, pixel_values, high_res_pixel_values,
                     cache, last_only=True)
  logits, cache = out.logits, out.cache  # [B, 1, V]
  b, vocab = logits.shape[0], logits.shape[-1]
  seen = jnp.zeros((b, vocab if sampling.repetition_penalty != 1.0 else 1), bool)
  state = DecodeState(cache=cache, tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                      step=jnp.zeros((), jnp.int32), done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
                      seen=_mark(seen, jnp.where(penalised_ids < 0, vocab, penalised_ids)),
                      rng=jax.random.key(seed))
  return _record(state, logits[:, 0], cache, eos_ids, pad_id, sampling)


def decode_step(module: nn.Module, params, state: DecodeState, eos_ids: jax.Array, *, pad_id: int,
                sampling: SamplingConfig) -> DecodeState:
  """Feeds every row's last token at the next cache slot and samples the following one."""
  last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # [B, 1]
  positions = state.cache.next_positions()[:, None]
  out = module.apply({"params": params}, last, jnp.ones_like(last), positions, None, None, state.cache,
                     last_only=True)
  return _record(state, out.logits[:, 0], out.cache, eos_ids, pad_id, sampling)


def decode(module: nn.Module, params, state: DecodeState, eos_ids: jax.Array, *, pad_id: int,
           sampling: SamplingConfig) -> DecodeState:
  """decode_step on device until every row is done or the token buffer is full."""

  def cond(s: DecodeState):
    return (s.step < s.tokens.shape[1]) & ~jnp.all(s.done)

  def body(s: DecodeState):
    return decode_step(module, params, s, eos_ids, pad_id=pad_id, sampling=sampling)

  return jax.lax.while_loop(cond, body, state)


def enable_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory` across processes (JAX's persistent compilation cache)."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----- host side: the defaults of a call, prompt buckets, the output -----
DEFAULT_MAX_NEW_TOKENS = 64
GENERATION_CONFIG_FILE = "generation_config.json"  # transformers' file, beside a checkpoint's config.json


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """The EOS and pad ids a generation call falls back to: a checkpoint's generation_config.json (`read`), each
  replaced by the caller's argument where one is given (`override`). Its other fields are not read: dvl_jax
  generates greedily by default, `DEFAULT_MAX_NEW_TOKENS` tokens at most.

  Attributes:
    eos_token_id: the ids that stop a row; () stops none (a row runs to max_new_tokens), as None does.
    pad_token_id: the id after a row's end and in the prompt's bucket padding; None: `pad_id` picks one.
  """

  eos_token_id: tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    eos = self.eos_token_id
    if eos is not None:  # one id, or several (a list in JSON): a tuple, so the config stays hashable
      object.__setattr__(self, "eos_token_id", (int(eos),) if isinstance(eos, (int, np.integer)) else
                         tuple(int(i) for i in eos))

  @classmethod
  def read(cls, directory: str | os.PathLike) -> GenerationConfig:
    """The EOS and pad ids of `directory`'s generation_config.json; None for each where it or the file is absent."""
    path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
      return cls()
    with open(path) as f:
      raw = json.load(f)
    return cls(eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"))

  def override(self, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None) -> GenerationConfig:
    """This config with the caller's ids where they are given (not None), as `Model.generate` takes them."""
    return GenerationConfig(eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id,
                            pad_token_id=self.pad_token_id if pad_token_id is None else pad_token_id)

  @property
  def eos_ids(self) -> np.ndarray:
    """int32 [E], the ids that stop a row; empty for none."""
    return np.asarray(self.eos_token_id or (), np.int32)

  @property
  def pad_id(self) -> int:
    """`pad_token_id`, else the first EOS id (as transformers' generate), else 0."""
    if self.pad_token_id is not None:
      return int(self.pad_token_id)
    return self.eos_token_id[0] if self.eos_token_id else 0


def bucket_length(length: int) -> int:
  """Prompt lengths are padded up to a multiple of 32 up to 1024, of 128 up to 4096, then of 512: each bucket
  is one compiled prefill, and the padding is work thrown away (an image prompt of ~600 tokens would prefill
  640 at a step of 128, +7%; 608 at 32). A batch job with one prompt compiles one program; a mix of prompt
  lengths a few more (the persistent compilation cache keeps them across runs)."""
  step = 32 if length <= 1024 else 128 if length <= 4096 else 512
  return max(step, -(-length // step) * step)


@dataclasses.dataclass
class GenerationOutput:
  """What `Model.generate` returns: the new tokens of each row, never the prompt.

  Attributes:
    tokens: int32 [B, max_new_tokens], each row's new tokens then `pad_token_id`.
    lengths: int32 [B], the new tokens per row (its EOS included).

  `out[i]` is row i's new tokens cut at its length, and iterating gives each row so, hence
  `processor.batch_decode(out)` and `processor.decode(out[0])` work as with transformers. transformers' generate
  returns the prompt and then the new tokens, for DeepSeek-VL too (the processor passes input_ids); `sequences`
  here is only what follows the prompt, transformers' `output[:, inputs["input_ids"].shape[1]:]`.
  """

  tokens: np.ndarray
  lengths: np.ndarray

  @property
  def sequences(self) -> np.ndarray:
    """The new tokens int32 [B, max_new_tokens], as `tokens` (transformers' name; there it includes the prompt)."""
    return self.tokens

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, row: int) -> np.ndarray:
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
      raise TypeError(f"GenerationOutput[{row!r}]: index it by row, out[i] (row i's new tokens, cut at its length). "
                      "For the padded [B, max_new_tokens] array use out.tokens or out.sequences (out.lengths the "
                      "lengths); for text, processor.batch_decode(out).")
    return self.tokens[row, :self.lengths[row]]

  def __iter__(self) -> Iterator[np.ndarray]:
    return (self[i] for i in range(len(self)))
