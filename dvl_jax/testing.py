"""Tiny random DeepSeek-VL checkpoints in the transformers `-hf` layout, for tests and demos.

Needs the `test` extra (torch, transformers); nothing else in dvl_jax imports this module. Nothing is
downloaded: the tokenizer is a small byte-level BPE trained here with DeepSeek's special tokens.
"""

from __future__ import annotations

BOS, EOS, IMAGE = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>"
CORPUS = [
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.",
    "User: Describe this image in detail.\n\nAssistant: A dog sits on the grass; the sky is blue.",
    "What is in the chart? Which image is brighter? Compare Figure 1 and Figure 2.",
    "Ünïcödé: café, naïve, 12 años, 東京, 你好, emoji 🙂, tabs\tand  spaces.",
]


def write_tokenizer(directory: str, vocab_size: int = 320):
  """Trains a tiny byte-level BPE (as DeepSeek's) and saves it as a transformers LlamaTokenizerFast with BOS,
  EOS (= pad) and <image_placeholder>, as the -hf checkpoints declare them. Returns the tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import LlamaTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 10, trainer)
  tok.add_tokens([IMAGE])
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, tok.token_to_id(BOS))])
  fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, add_bos_token=True,
                            add_eos_token=False, padding_side="left", extra_special_tokens={"image_token": IMAGE})
  fast.save_pretrained(directory)
  return fast


def hf_image_processor(hybrid: bool = False, size: int = 384, high_res_size: int = 1024, **kwargs):
  """transformers' PIL-backend image processors as the -hf checkpoints configure them (ARCHITECTURE.md 2.2).
  They take RGB images: transformers' load_image (files, URLs, chat templates) converts to RGB first."""
  from transformers import DeepseekVLHybridImageProcessorPil, DeepseekVLImageProcessorPil
  from transformers.image_utils import PILImageResampling

  half = [0.5, 0.5, 0.5]
  if hybrid:
    return DeepseekVLHybridImageProcessorPil(
        image_mean=half, image_std=half, resample=PILImageResampling.BILINEAR, size={"height": size, "width": size},
        high_res_size={"height": high_res_size, "width": high_res_size}, **kwargs)
  return DeepseekVLImageProcessorPil(image_mean=half, image_std=half, size={"height": size, "width": size}, **kwargs)


def hf_processor(directory: str, hybrid: bool = False, num_image_tokens: int = 576, chat_template: str | None = None,
                 **sizes):
  """A transformers DeepseekVL(Hybrid)Processor with the tiny tokenizer, saved to `directory`."""
  from transformers import DeepseekVLHybridProcessor, DeepseekVLProcessor

  tokenizer = write_tokenizer(directory)
  cls = DeepseekVLHybridProcessor if hybrid else DeepseekVLProcessor
  processor = cls(image_processor=hf_image_processor(hybrid, **sizes), tokenizer=tokenizer,
                  chat_template=chat_template, num_image_tokens=num_image_tokens)
  processor.save_pretrained(directory)
  return processor


def write_tiny_checkpoint(directory: str, seed: int = 0) -> None:
  """A few-MB random DeepseekVLForConditionalGeneration with its processor files, at the real image geometry
  (SigLIP 384 px, patch 16, 576 tokens per image), saved with save_pretrained."""
  import torch
  from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

  processor = hf_processor(directory, num_image_tokens=576, size=384)
  config = DeepseekVLConfig(
      text_config=dict(model_type="llama", vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096),
      vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=384, patch_size=16, hidden_act="gelu",
                         layer_norm_eps=1e-6, vision_use_head=False),
      image_token_id=processor.image_token_id, tie_word_embeddings=False)
  torch.manual_seed(seed)
  DeepseekVLForConditionalGeneration(config).save_pretrained(directory)
