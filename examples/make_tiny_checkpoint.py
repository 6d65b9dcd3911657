"""Writes a tiny random DeepSeek-VL checkpoint in the transformers `-hf` layout (needs torch + transformers).

  python examples/make_tiny_checkpoint.py OUT_DIR

A stand-in for a released checkpoint on machines that cannot download one: the full architecture (SigLIP at
384 px with 576 tokens per image, MLP aligner, LLaMA decoder) at a few MB.
"""

import sys

import torch
from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration


def main(out_dir: str) -> None:
  config = DeepseekVLConfig(
      text_config=dict(model_type="llama", vocab_size=102400, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096),
      vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=384, patch_size=16, hidden_act="gelu",
                         layer_norm_eps=1e-6, vision_use_head=False),
      image_token_id=100015, tie_word_embeddings=False)
  torch.manual_seed(0)
  DeepseekVLForConditionalGeneration(config).save_pretrained(out_dir)
  print(f"Wrote a tiny random -hf DeepSeek-VL checkpoint to {out_dir}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  main(sys.argv[1])
