"""PyTorch -> dvl_jax checkpoint conversion. The CLI is convert/torch_to_orbax.py."""

from dvl_jax.convert.converter import convert_checkpoint, main
from dvl_jax.convert.hf_config import from_hf_config

__all__ = ["convert_checkpoint", "from_hf_config", "main"]
