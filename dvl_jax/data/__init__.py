"""The training data pipeline: data files (captions, LLaVA / transformers conversations, text; JSON lines, JSON,
Parquet) -> tokenised, masked, packed or padded batches for the train step, on Grain. Start at pipeline.py."""

from dvl_jax.data.batches import HostBatch
from dvl_jax.data.config import DataConfig, SourceConfig
from dvl_jax.data.examples import Example, make_example, tokenize_conversation, tokenize_text
from dvl_jax.data.formats import BadRecord, Conversation, Text, parse
from dvl_jax.data.pipeline import DataIterator, make_dataset
from dvl_jax.data.report import DataError, SkipReport
from dvl_jax.data.rows import Skipped

__all__ = ["BadRecord", "Conversation", "DataConfig", "DataError", "DataIterator", "Example", "HostBatch",
           "SkipReport", "Skipped", "SourceConfig", "Text", "make_dataset", "make_example", "parse",
           "tokenize_conversation", "tokenize_text"]
