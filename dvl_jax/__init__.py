"""dvl_jax: DeepSeek-VL in JAX/Flax."""

import os as _os

# XLA:CPU's concurrency-optimised scheduler runs independent ops side by side, and on a small host they fight
# the matmuls' own threads: measured on 2 cores, the 130M decode step ran 1.25x slower with it and a plain
# unrolled stack of 12 layers' matmuls 9x slower (BENCHMARKS.md). CPU-only flag, read when JAX starts its CPU
# backend; set it yourself (=true) to keep XLA's default.
# Not with several simulated CPU devices (xla_force_host_platform_device_count): there, without it, the fsdp
# train step's independent all-gathers ran in different orders on different devices and deadlocked (8 devices,
# 2 cores: each half of the devices waiting in another all-gather, aborted after 40 s).
_flags = _os.environ.get("XLA_FLAGS", "")
_simulated = [f.split("=", 1)[1] for f in _flags.split() if f.startswith("--xla_force_host_platform_device_count=")]
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags and _simulated in ([], ["1"]):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") +
                              " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

from dvl_jax.assets import default_checkpoint
from dvl_jax.config import (AlignerConfig, LlamaConfig, ModelConfig, SamConfig, SiglipConfig, deepseek_vl_1_3b,
                            deepseek_vl_7b, preset, shapes, tiny, tiny_hybrid)
from dvl_jax.generate import GenerationConfig, GenerationOutput, enable_compilation_cache
from dvl_jax.model import Model, abstract_params, init_params, load
# After dvl_jax.model: importing dvl_jax.convert loads the converter, which imports the model.
from dvl_jax.convert.hf_config import from_hf_config
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.processing import Processor
from dvl_jax.sharding import MeshSpec, ShardingPlan, make_mesh

__all__ = [
    "AlignerConfig", "GenerationConfig", "KVCache", "LlamaConfig", "MeshSpec", "Model", "ModelConfig", "Processor",
    "SamConfig", "ShardingPlan", "SiglipConfig", "make_mesh",
    "GenerationOutput", "abstract_params", "deepseek_vl_1_3b", "deepseek_vl_7b", "default_checkpoint",
    "enable_compilation_cache",
    "from_hf_config", "init_params", "load",
    "preset", "shapes", "tiny", "tiny_hybrid",
]
