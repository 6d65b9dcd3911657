"""What a forward pass returns: the logits and the KV cache, as one small typed pytree (as gemma's `Output`)."""

from __future__ import annotations

import flax.struct
import jax

from dvl_jax.nn.kv_cache import KVCache


@flax.struct.dataclass
class Output:
  """The output of `DeepseekVL` and `LlamaDecoder` (`out = module.apply(...)`), and of `Model.forward`.

  Attributes:
    logits: [B, T, V], or [B, 1, V] with `last_only`. In the modules, V is the plan's padded vocabulary when it
      pads one (the padded ids' logits at the lowest finite value); `Model.forward` cuts them to the real one.
    cache: the updated KVCache, or None for a forward without one.
  """

  logits: jax.Array
  cache: KVCache | None = None
