"""Checkpoints that ship inside the package.

shapes/: the shapes captioner, a 2.9M-parameter DeepSeek-VL (the `shapes` preset) trained from scratch by
configs/shapes/train.sh on synthetic images of coloured circles, squares and triangles
(dvl_jax/data/shapes.py). It describes such images ("a red circle and a blue square") and answers questions
about them; it knows nothing else. infer.py and the chat tools open it when no checkpoint is given.
"""

from __future__ import annotations

import os

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes")


def default_checkpoint() -> str:
  """The shipped shapes checkpoint's directory (an inference checkpoint: params/, dvl_config.json, tokenizer)."""
  if not os.path.isfile(os.path.join(SHAPES, "dvl_config.json")):
    raise FileNotFoundError(f"The default checkpoint is missing from this installation ({SHAPES}); reinstall "
                            "dvl_jax, or give a checkpoint (--ckpt), e.g. one written by "
                            "convert/torch_to_orbax.py or train.py.")
  return SHAPES
