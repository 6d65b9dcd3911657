"""PyTorch -> dvl_jax checkpoint conversion. The CLI is convert/torch_to_orbax.py."""

from dvl_jax.convert.converter import convert_checkpoint, main

__all__ = ["convert_checkpoint", "main"]
