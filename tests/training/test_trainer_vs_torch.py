"""train() against a plain PyTorch loop: from a checkpoint converted from a tiny transformers model, 5 steps over
the same batches (the data pipeline is deterministic given its seed) give, step for step, the loss, gradient
norm and learning rate of transformers + torch.optim.AdamW + get_cosine_schedule_with_warmup + clip_grad_norm_."""

import jax
import numpy as np
import pytest
import torch

from training.runs import experiment_yaml
from dvl_jax.data.pipeline import DataIterator
from dvl_jax.processing.processor import Processor
from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.metrics import read_metrics
from dvl_jax.training.trainer import train
from reference import to_torch_images

STEPS = 5
PEAK, WARMUP, CLIP = 1e-3, 2, 1.0  # experiment_yaml's optimizer, and OptimizerConfig's default clip_norm


def _torch_labels(ids, mask, loss_mask) -> np.ndarray:
  """transformers' labels (unshifted; its loss shifts them): the id where a real token is to be learned, else -100."""
  return np.where((loss_mask == 1) & (mask != 0), ids, -100).astype(np.int64)  # [B, T]


def _torch_run(hf_dir, batches, image_token_id, tokens_per_image) -> list[dict[str, float]]:
  """A plain PyTorch loop over `batches` (HostBatch.arrays): each step's loss, pre-clip grad norm and lr."""
  from transformers import DeepseekVLForConditionalGeneration, get_cosine_schedule_with_warmup

  torch.manual_seed(0)
  model = DeepseekVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).train()
  params = [p for p in model.parameters() if p.requires_grad]
  assert len(params) == len(list(model.parameters()))  # S3 trains every param of this non-hybrid model
  opt = torch.optim.AdamW(params, lr=PEAK, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
  schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
  out = []
  for arrays in batches:
    ids, mask, loss_mask = arrays["input_ids"], arrays["attention_mask"], arrays["loss_mask"]  # [B, T] each
    assert set(np.unique(mask)) <= {0, 1}, "expected padding mode (one sample a row), not packed segments"
    t_mask = torch.tensor(mask)
    positions = t_mask.long().cumsum(-1) - 1  # [B, T], as _torch_loss in test_step.py
    positions.masked_fill_(t_mask == 0, 1)
    np.testing.assert_array_equal(positions.numpy(), arrays["positions"])  # the pipeline's own positions
    images = ((ids == image_token_id).sum(-1) // tokens_per_image).tolist()  # images per row
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad()
    loss = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=t_mask, position_ids=positions,
                 pixel_values=to_torch_images(arrays["pixel_values"], images),
                 labels=torch.tensor(_torch_labels(ids, mask, loss_mask))).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    schedule.step()
    out.append({"loss": loss.item(), "grad_norm": norm.item(), "learning_rate": lr})
  return out


def _rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow  # ~26 s on 2 CPU cores
def test_five_steps_equal_a_pytorch_loop(run_files, tmp_path):
  with open(run_files / "hf" / "config.json") as f:  # the fixture's model: untied, so lm_head trains alone
    assert '"tie_word_embeddings": false' in f.read()
  path = experiment_yaml(run_files, tmp_path / "exp.yaml", tmp_path / "run")
  experiment = load_experiment(path, [f"train.steps={STEPS}", "train.export=false", "train.checkpoint_every=100"])
  result = train(experiment, progress=False, devices=jax.devices()[:1])  # mesh data=1 (the tests have 8 CPUs)
  assert result.step == STEPS
  ours = read_metrics(str(tmp_path / "run"))
  assert [m["step"] for m in ours] == list(range(1, STEPS + 1))

  processor = Processor.from_pretrained(str(run_files / "init"))
  with DataIterator(experiment.data, processor, process_index=0, process_count=1) as data:
    batches = [next(data).arrays for _ in range(STEPS)]
  expected = _torch_run(str(run_files / "hf"), batches, processor.tokenizer.image_token_id,
                        processor.num_image_tokens)
  for m, b in zip(ours, batches):  # the run's batches: its supervised tokens are the ones torch's loss averages
    assert m["tokens"] == int((_torch_labels(b["input_ids"], b["attention_mask"], b["loss_mask"])[:, 1:] != -100)
                              .sum()), m

  lines = [f"step {m['step']}: loss {m['loss']:.6f} / {e['loss']:.6f}, grad_norm {m['grad_norm']:.6f} / "
           f"{e['grad_norm']:.6f}, lr {m['learning_rate']:.3e} / {e['learning_rate']:.3e}"
           for m, e in zip(ours, expected)]
  print("\n(ours / torch)\n" + "\n".join(lines))
  report = "\n".join(lines)
  # The run must be able to fail: every step's loss differs, and the lr moves (0 at step 1, the peak at 3).
  losses = [e["loss"] for e in expected]
  assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-3, report
  assert [e["learning_rate"] for e in expected][:3] == [0.0, PEAK / 2, PEAK], report
  for key, tol in (("loss", 1e-4), ("grad_norm", 1e-4)):
    errs = [_rel(m[key], e[key]) for m, e in zip(ours, expected)]
    print(f"{key}: largest relative difference {max(errs):.2e}")
    assert max(errs) < tol, f"{key}: relative errors {errs}\n{report}"
  for m, e in zip(ours, expected):
    assert abs(m["learning_rate"] - e["learning_rate"]) <= 1e-6 * PEAK, report
