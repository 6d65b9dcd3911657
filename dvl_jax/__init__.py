"""dvl_jax: DeepSeek-VL in JAX/Flax."""

from dvl_jax.config import (AlignerConfig, LlamaConfig, ModelConfig, SamConfig, SiglipConfig, deepseek_vl_1_3b,
                            deepseek_vl_7b, from_hf_config, preset, tiny)
from dvl_jax.model import Model, abstract_params, init_params, load
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.processing import Processor

__all__ = [
    "AlignerConfig", "KVCache", "LlamaConfig", "Model", "ModelConfig", "Processor", "SamConfig", "SiglipConfig",
    "abstract_params", "deepseek_vl_1_3b", "deepseek_vl_7b", "from_hf_config", "init_params", "load",
    "preset", "tiny",
]
