"""Batch captioning (infer.py): sources of images, the resumable JSONL of results, the prefetching loop."""

from dvl_jax.captioning.results import ResultFile
from dvl_jax.captioning.runner import DEFAULT_PROMPT, Captioner, Summary
from dvl_jax.captioning.sources import Item, Sources, collect

__all__ = ["DEFAULT_PROMPT", "Captioner", "Item", "ResultFile", "Sources", "Summary", "collect"]
