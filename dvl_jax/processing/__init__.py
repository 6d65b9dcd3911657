"""Turning conversations and images into model inputs, and ids back into text."""

from dvl_jax.processing.images import ImageConfig, ImageError, load_image, preprocess, to_rgb
from dvl_jax.processing.processor import Processor
from dvl_jax.processing.tokenizer import Tokenizer

__all__ = ["ImageConfig", "ImageError", "Processor", "Tokenizer", "load_image", "preprocess", "to_rgb"]
