"""The experiments in configs/: each loads; the paper presets carry Table 4 of the DeepSeek-VL paper. (The tiny one
trains in tests/training/test_trainer.py.)"""

import glob
import os

import pytest

from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.optimizer import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))

# arXiv 2403.05525, Table 4 ("Detailed hyperparameters of our DeepSeek-VL"), per model and stage: learning rate,
# scheduler, warm-up steps, training steps, batch size, sequence length, packing. Every stage: AdamW(0.9, 0.95),
# weight decay 0, gradient clip 1.0.
TABLE_4 = {
    ("1.3b", 1): (1.0e-3, "cosine", 128, 15000, 256, 512, False),
    ("1.3b", 2): (3e-5, "step", 2000, 96000, 1024, 4096, True),
    ("1.3b", 3): (2.0e-5, "cosine", 256, 10000, 256, 4096, False),
    ("7b", 1): (1.0e-3, "cosine", 128, 15000, 256, 512, False),
    ("7b", 2): (4.2e-5, "step", 2000, 42000, 2304, 4096, True),
    ("7b", 3): (2.0e-5, "cosine", 256, 10000, 256, 4096, False),
}


def test_every_config_loads():
  assert len(CONFIGS) == 12  # 3 + 3 DeepSeek-VL stages, tiny, the shapes recipe's 4 and its alternative stage 3
  for path in CONFIGS:
    load_experiment(path)


@pytest.mark.parametrize("model,stage", sorted(TABLE_4))
def test_the_paper_presets_carry_table_4(model, stage):
  (path,) = glob.glob(os.path.join(ROOT, "configs", f"deepseek-vl-{model}", f"stage{stage}_*.yaml"))
  e = load_experiment(path)
  o, d = e.optimizer, e.data
  assert (o.learning_rate, o.schedule, o.warmup_steps, e.train.steps, d.batch_size, d.seq_len, d.packing) == \
      TABLE_4[model, stage]
  assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 0.0, 1.0)
  assert o.trainable_patterns == STAGES[f"S{stage}"]
  assert e.model.preset == f"deepseek-vl-{model}-chat"
