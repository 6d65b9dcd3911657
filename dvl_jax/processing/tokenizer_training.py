"""A new processor directory for a model trained from scratch: a byte-level BPE tokenizer (DeepSeek's kind)
trained on the model's text with DeepSeek's special tokens, and the image processor at the model's image size.

  write_processor("data/shapes/processor", texts, image_size=128, vocab_size=512)
  Processor.from_pretrained("data/shapes/processor")

The files are the ones a DeepSeek-VL `-hf` checkpoint ships (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, processor_config.json, chat_template.jinja, generation_config.json), written with
`tokenizers` alone; transformers' DeepseekVLProcessor.from_pretrained reads them too. The special tokens take
the first ids: BOS 0, EOS 1 (also the pad token, as in the original), <image_placeholder> 2;
a model config's image_token_id must be IMAGE_TOKEN_ID.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from dvl_jax.processing.chat import SYSTEM_PROMPT, hf_chat_template
from dvl_jax.processing.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN
from dvl_jax.staging import staged_directory

SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID = range(3)
# The chat template's own text, part of every training corpus.
TEMPLATE_TEXTS = (SYSTEM_PROMPT, "User:", "Assistant:", "\n\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
  """A `tokenizers.Tokenizer`: byte-level BPE, merges learned from `texts` plus the chat template's text, at most
  `vocab_size` tokens (the 256 bytes, the special tokens and the merges)."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([*TEMPLATE_TEXTS, *texts], trainer)
  for token, want in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
    assert tok.token_to_id(token) == want, (token, tok.token_to_id(token))
  # BOS first, as DeepSeek's tokenizer adds it (for transformers; dvl_jax's Tokenizer adds it itself).
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                                     special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)])
  return tok


def _added(token_id: int, token: str) -> dict:
  return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
          "special": token_id != IMAGE_TOKEN_ID}


def write_processor(directory: str, texts: Iterable[str], *, image_size: int, num_image_tokens: int,
                    vocab_size: int, max_length: int = 4096, generation: dict | None = None) -> str:
  """Trains the tokenizer and writes the processor files to `directory` (replaced only once complete).

  num_image_tokens: the tokens each image stands for in the model ((image_size / patch_size) ** 2).
  generation: sampling defaults for generation_config.json (transformers' keys: do_sample, temperature, ...),
    which exported checkpoints carry and the chat tools start from.
  """
  tok = train_tokenizer(texts, vocab_size)
  tokenizer_config = {
      "add_bos_token": True, "add_eos_token": False, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
      "pad_token": EOS_TOKEN, "image_token": IMAGE_TOKEN, "model_max_length": max_length, "padding_side": "left",
      "clean_up_tokenization_spaces": False, "tokenizer_class": "TokenizersBackend",
      "processor_class": "DeepseekVLProcessor",
      "added_tokens_decoder": {str(i): _added(i, t) for i, t in enumerate(SPECIAL_TOKENS)},
  }
  image_processor = {
      "image_processor_type": "DeepseekVLImageProcessor", "size": {"height": image_size, "width": image_size},
      "min_size": 14, "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
      "background_color": [127, 127, 127],
  }
  files = {
      "tokenizer_config.json": tokenizer_config,
      "special_tokens_map.json": {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN},
      "processor_config.json": {"image_processor": image_processor, "processor_class": "DeepseekVLProcessor",
                                "num_image_tokens": num_image_tokens},
      "generation_config.json": {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
                                 "pad_token_id": EOS_TOKEN_ID, **(generation or {})},
  }
  with staged_directory(directory, overwrite=True, log=lambda _: None) as tmp:
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(hf_chat_template())
    for name, content in files.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
  return directory
