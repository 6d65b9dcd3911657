"""Learning-rate schedules against torch's and transformers' schedulers and formulas written out here."""

import math

import jax
import numpy as np
import pytest
import torch
import transformers

from dvl_jax.training import schedules

PEAK = 2e-5


def _torch_lrs(make_scheduler, steps: int) -> np.ndarray:
  """The lr torch uses at optimizer steps 0..steps-1 (scheduler.step() after each optimizer step)."""
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
  sched = make_scheduler(opt)
  lrs = []
  for _ in range(steps):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  return np.asarray(lrs)


def _ours(schedule, steps: int) -> np.ndarray:
  return np.asarray([float(schedule(s)) for s in range(steps)])


@pytest.mark.parametrize("final_fraction", [0.0, 0.1])
def test_cosine_without_warmup_is_torch_cosine_annealing(final_fraction):
  total = 40
  want = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=final_fraction * PEAK),
                    total + 1)
  np.testing.assert_allclose(_ours(schedules.cosine(PEAK, total, 0, final_fraction), total + 1), want,
                             rtol=1e-5, atol=PEAK * 1e-6)


def test_cosine_with_warmup_is_transformers_schedule():
  total, warmup = 50, 7
  want = _torch_lrs(lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total), total + 1)
  got = _ours(schedules.make_schedule("cosine", PEAK, total, warmup), total + 1)
  assert got[0] == 0.0 and got[warmup] == pytest.approx(PEAK)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=PEAK * 1e-6)


def test_cosine_with_warmup_and_floor_is_the_formula():
  total, warmup, f = 30, 4, 0.2

  def formula(s):
    if s < warmup:
      return PEAK * s / warmup
    p = min(1.0, (s - warmup) / (total - warmup))
    return f * PEAK + (PEAK - f * PEAK) * (1 + math.cos(math.pi * p)) / 2

  steps = total + 5  # flat at the floor after total_steps
  np.testing.assert_allclose(_ours(schedules.cosine(PEAK, total, warmup, f), steps),
                             [formula(s) for s in range(steps)], rtol=1e-5, atol=PEAK * 1e-6)


def test_step_without_warmup_is_torch_multistep():
  total = 100
  want = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[80, 90], gamma=0.1 ** 0.5), total + 3)
  got = _ours(schedules.step(PEAK, total), total + 3)  # defaults: decay at 0.8 and 0.9 by 0.1 ** 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # DeepSeek LLM's steps: 31.6% of the peak after 80% of training, 10% after 90%.
  assert got[85] == pytest.approx(0.316 * PEAK, rel=1e-3) and got[95] == pytest.approx(0.1 * PEAK, rel=1e-5)


def test_step_with_warmup_is_the_formula():
  total, warmup, at, factor = 40, 6, (0.5, 0.75), 0.3

  def formula(s):
    lr = PEAK * min(1.0, s / warmup)
    return lr * factor ** sum(s >= int(a * total) for a in at)

  steps = total + 2
  np.testing.assert_allclose(_ours(schedules.make_schedule("step", PEAK, total, warmup, decay_at=at,
                                                           decay_factor=factor), steps),
                             [formula(s) for s in range(steps)], rtol=1e-5, atol=PEAK * 1e-7)


def test_constant_with_warmup_is_transformers_schedule():
  total, warmup = 20, 5
  want = _torch_lrs(lambda o: transformers.get_constant_schedule_with_warmup(o, warmup), total)
  np.testing.assert_allclose(_ours(schedules.make_schedule("constant", PEAK, total, warmup), total), want, rtol=1e-6)


def test_schedules_take_traced_steps():
  sched = schedules.cosine(PEAK, 10, 2)
  got = jax.jit(jax.vmap(sched))(np.arange(12, dtype=np.int32))
  np.testing.assert_allclose(got, _ours(sched, 12), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="linear"), r"Unknown learning-rate schedule 'linear'; expected one of \('cosine', 'step', 'constant'\)"),
    (dict(warmup_steps=11), r"warmup_steps must be an int in \[0, total_steps=10\], got 11"),
    (dict(warmup_steps=-1), r"warmup_steps must be an int"),
    (dict(total_steps=0), r"total_steps must be a positive int, got 0"),
    (dict(peak_value=0.0), r"peak learning rate must be > 0"),
    (dict(final_fraction=1.5), r"final_fraction .* must lie in \[0, 1\], got 1.5"),
    (dict(name="step", warmup_steps=8), r"decay_at=0.8 of total_steps=10 decays at step 8, inside the warm-up of 8"),
    (dict(name="step", decay_at=(0.9, 0.8)), r"decay_at must be strictly increasing fractions"),
    (dict(name="step", decay_at=(0.0,)), r"decay_at must be strictly increasing fractions"),
    (dict(name="step", decay_at=(0.81, 0.85)), r"repeated decay steps \(8, 8\)"),
    (dict(name="step", decay_factor=0.0), r"decay_factor .* must lie in \(0, 1\], got 0.0"),
])
def test_bad_values_are_errors(kwargs, match):
  args = dict(name="cosine", peak_value=1e-3, total_steps=10, warmup_steps=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    schedules.make_schedule(args.pop("name"), **args)
