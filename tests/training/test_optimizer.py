"""The optimizer against torch.optim.AdamW + clip_grad_norm_ + LambdaLR; freezing by stage on the real param tree."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
import torch

import dvl_jax
from dvl_jax.training import optimizer as opt_lib


def _path(keys) -> str:
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def _flat(tree) -> dict:
  return {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_like(abstract, seed: int, scale: float = 1.0):
  """numpy float32 arrays shaped like `abstract`, each drawn from its own stream."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), abstract)


# A few params shaped like the model's, under their real paths; high_res_vision_model (SAM) is frozen.
_SHAPES = {
    "aligner": {"linear1": {"kernel": (8, 6), "bias": (8,)}},
    "language_model": {"layers_0": {"mlp": {"up_proj": {"kernel": (12, 6)}}}, "norm": {"scale": (6,)}},
    "vision_model": {"patch_embedding": {"kernel": (4, 4, 3, 6)}, "post_layernorm": {"bias": (6,)}},
    "high_res_vision_model": {"pos_embed": (1, 4, 4, 6)},
}
_ABSTRACT = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), _SHAPES, is_leaf=lambda x: isinstance(x, tuple))
_TRAINED = ("aligner/.*", "language_model/.*", "vision_model/.*")

CASES = {
    # The paper's recipe: no weight decay, one lr, cosine after a warm-up.
    "paper": (dict(learning_rate=1e-2, total_steps=10, schedule="cosine", warmup_steps=2, trainable=_TRAINED),
              lambda path: (1.0, True)),
    # Decoupled weight decay (not on biases and norm scales), SigLIP at a tenth of the lr, step decay at step 2.
    "decay+groups": (dict(learning_rate=1e-2, total_steps=4, schedule="step", warmup_steps=1, decay_at=(0.5,),
                          decay_factor=0.3, weight_decay=0.1, trainable=_TRAINED,
                          lr_multipliers={"vision_model/.*": 0.1}),
                     lambda path: (0.1 if path.startswith("vision_model/") else 1.0,
                                   not path.endswith(("/bias", "/scale")))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_equal_torch_adamw_with_clipping(case):
  fields, torch_group_of = CASES[case]
  config = opt_lib.OptimizerConfig(**fields)
  params = _random_like(_ABSTRACT, 0)
  # Steps 0 and 2 clip (norm >> 1), step 1 does not; the frozen gradients are huge and must not count.
  grads = [_random_like(_ABSTRACT, 1 + i, scale) for i, scale in enumerate([3.0, 0.01, 5.0])]
  for g in grads:
    g["high_res_vision_model"]["pos_embed"] *= 1e4
  norms = [np.sqrt(sum(np.sum(v ** 2) for k, v in _flat(g).items() if not k.startswith("high_res"))) for g in grads]
  assert norms[0] > 1 and norms[1] < 1 and norms[2] > 1, norms

  # torch: the trainable params only, one param group per (lr multiplier, decayed or not).
  flat = _flat(params)
  trained = [k for k in flat if not k.startswith("high_res_vision_model/")]
  tparams = {k: torch.nn.Parameter(torch.tensor(flat[k])) for k in trained}
  groups = {}
  for k in trained:
    mult, decayed = torch_group_of(k)
    groups.setdefault((mult, decayed), []).append(tparams[k])
  wd = config.weight_decay
  topt = torch.optim.AdamW([{"params": ps, "lr": config.learning_rate * m, "weight_decay": wd if d else 0.0}
                            for (m, d), ps in groups.items()], lr=config.learning_rate, betas=(config.b1, config.b2),
                           eps=config.eps)
  schedule = config.learning_rate_fn()
  tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: float(schedule(s)) / config.learning_rate)

  tx = opt_lib.make_optimizer(config, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)

    gflat = _flat(g)
    for k, p in tparams.items():
      p.grad = torch.tensor(gflat[k])
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), config.clip_norm)
    topt.step()
    tsched.step()

    got = _flat(params)
    for k, p in tparams.items():
      np.testing.assert_allclose(got[k], p.detach().numpy(), atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_array_equal(got["high_res_vision_model/pos_embed"], flat["high_res_vision_model/pos_embed"])
  # The params moved by much more than the tolerance: the comparison has teeth.
  assert max(np.abs(got[k] - flat[k]).max() for k in trained) > 1e-3


def test_clipping_can_be_turned_off():
  config = opt_lib.OptimizerConfig(learning_rate=1e-2, total_steps=10, trainable=("aligner/.*",), clip_norm=None,
                                   schedule="constant")
  params = _random_like(_ABSTRACT, 0)
  grads = _random_like(_ABSTRACT, 1, 100.0)
  tx = opt_lib.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(g) (up to eps), whatever the gradient's scale.
  want = -1e-2 * np.sign(grads["aligner"]["linear1"]["kernel"])
  np.testing.assert_allclose(updates["aligner"]["linear1"]["kernel"], want, rtol=1e-5)


def _trained_by_table(path: str, stage: str) -> bool:
  """Table 4: S1 the aligner; S2 + the LLM; S3 + SigLIP; SAM never."""
  top = path.split("/")[0]
  return top in {"S1": {"aligner"}, "S2": {"aligner", "language_model"},
                 "S3": {"aligner", "language_model", "vision_model"}}[stage]


@pytest.mark.parametrize("model", ["tiny", "tiny_hybrid"])
def test_stages_train_what_the_paper_trains(model):
  abstract = dvl_jax.abstract_params(getattr(dvl_jax, model)())
  paths = list(_flat(abstract))
  assert any(p.startswith("high_res_vision_model/") for p in paths) == (model == "tiny_hybrid")
  for stage in ("S1", "S2", "S3"):
    mask = _flat(opt_lib.trainable_mask(abstract, opt_lib.paper_config(stage, total_steps=5000)))
    assert {p for p in paths if mask[p]} == {p for p in paths if _trained_by_table(p, stage)}, stage


def _state_arrays(state) -> dict:
  """The optimizer state's arrays with more than one element (not counts), by path."""
  return {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(state)[0] if np.size(v) > 1}


@pytest.mark.parametrize("stage", ["S1", "S2", "S3"])
def test_frozen_params_are_untouched_and_have_no_state(stage):
  abstract = dvl_jax.abstract_params(dvl_jax.tiny_hybrid())
  config = opt_lib.paper_config(stage, total_steps=100, warmup_steps=1, model="7b")
  params = _random_like(abstract, 0)
  tx = opt_lib.make_optimizer(config, abstract)  # built from shapes alone
  state = tx.init(params)
  update = jax.jit(tx.update)
  new = params
  for i in range(2):
    updates, state = update(_random_like(abstract, 1 + i), state, new)
    new = optax.apply_updates(new, updates)

  before, after = _flat(params), _flat(new)
  trained = {p for p in before if _trained_by_table(p, stage)}
  for p in before:
    if p in trained:
      assert not np.array_equal(after[p], before[p]), p
    else:
      assert after[p].tobytes() == before[p].tobytes(), p
  # Moments (mu, nu) exist for the trained params and for no other; nothing else in the state is an array.
  arrays = _state_arrays(state)
  owners = [next((p for p in before if k.endswith("/" + p)), None) for k in arrays]
  assert None not in owners, [k for k, o in zip(arrays, owners) if o is None]
  assert sorted(owners) == sorted(2 * [p for p in trained if before[p].size > 1])
  assert sum(v.size for v in arrays.values()) == 2 * sum(before[p].size for p in trained if before[p].size > 1)


def test_labels_name_groups_and_skip_decay_on_biases_and_scales():
  config = opt_lib.OptimizerConfig(learning_rate=1.0, total_steps=10, stage="S3", weight_decay=0.1,
                                   lr_multipliers=(("vision_model/.*", 0.1),))
  labels = _flat(opt_lib.param_labels(dvl_jax.abstract_params(dvl_jax.tiny_hybrid()), config))
  assert labels["high_res_vision_model/vision_encoder/pos_embed"] == "frozen"
  assert labels["aligner/proj/kernel"] == "trainable"
  assert labels["aligner/proj/bias"] == "trainable_no_decay"
  assert labels["language_model/norm/scale"] == "trainable_no_decay"
  assert labels["vision_model/position_embedding"] == "group0"
  assert labels["vision_model/layers/layer_norm1/scale"] == "group0_no_decay"


def test_config_is_hashable_and_normalised():
  a = opt_lib.OptimizerConfig(learning_rate=1e-3, total_steps=10, trainable=["aligner/.*"],
                              lr_multipliers={"aligner/.*": 2.0})
  b = dataclasses.replace(a)
  assert a.trainable == ("aligner/.*",) and a.lr_multipliers == (("aligner/.*", 2.0),)
  assert hash(a) == hash(b) and a == b


def test_paper_config_is_table_4():
  s1, s3 = opt_lib.paper_config("S1", total_steps=1000), opt_lib.paper_config("S3", total_steps=1000)
  s2_small, s2_big = (opt_lib.paper_config("S2", total_steps=10_000, model=m) for m in ("1.3b", "7b"))
  assert (s1.learning_rate, s1.schedule, s1.warmup_steps) == (1e-3, "cosine", 128)
  assert (s2_small.learning_rate, s2_big.learning_rate, s2_big.schedule, s2_big.warmup_steps) == (
      3e-5, 4.2e-5, "step", 2000)
  assert (s3.learning_rate, s3.schedule, s3.warmup_steps) == (2e-5, "cosine", 256)
  for c in (s1, s2_big, s3):
    assert (c.b1, c.b2, c.weight_decay, c.clip_norm) == (0.9, 0.95, 0.0, 1.0)


_BASE = dict(learning_rate=1e-3, total_steps=10)


@pytest.mark.parametrize("fields, match", [
    (dict(stage="S4"), r"Unknown training stage 'S4'; expected one of \('S1', 'S2', 'S3'\)"),
    (dict(), r"either stage .* or trainable .*, not neither"),
    (dict(stage="S1", trainable=("aligner/.*",)), r"not both"),
    (dict(stage="S1", trainable="aligner/.*"), r"takes a sequence, got the string 'aligner/.\*'"),
    (dict(trainable=("aligner/(",)), r"'aligner/\(' is not a valid regex"),
    (dict(stage="S1", schedule="linear"), r"Unknown learning-rate schedule 'linear'"),
    (dict(stage="S1", warmup_steps=20), r"warmup_steps must be an int in \[0, total_steps=10\]"),
    (dict(stage="S1", b2=1.0), r"b2 must lie in \[0, 1\)"),
    (dict(stage="S1", clip_norm=0.0), r"clip_norm must be > 0 \(or None"),
    (dict(stage="S1", lr_multipliers={"aligner/.*": 0}), r"\(regex, multiplier > 0\) pairs"),
])
def test_config_errors(fields, match):
  with pytest.raises((ValueError, TypeError), match=match):
    opt_lib.OptimizerConfig(**_BASE, **fields)


def test_paper_config_errors():
  with pytest.raises(ValueError, match=r"Unknown training stage 'S0'"):
    opt_lib.paper_config("S0", total_steps=100)
  with pytest.raises(ValueError, match=r"Unknown model size '13b' .* expected one of \('1.3b', '7b'\)"):
    opt_lib.paper_config("S2", total_steps=10_000, model="13b")


@pytest.mark.parametrize("fields, match", [
    # fullmatch: a bare prefix matches nothing; the message lists where paths start.
    (dict(trainable=("aligner",)),
     r"trainable regex 'aligner' matches no param; .* start with: aligner/high_res_vision_proj, aligner/proj, .*"
     r"high_res_vision_model/vision_encoder, .*language_model/layers_\*, .*vision_model/post_layernorm\.$"),
    (dict(trainable=("sam/.*",)), r"'sam/\.\*' matches no param"),
    # The trainable paths only (S1: the aligner) are listed.
    (dict(stage="S1", lr_multipliers={"vision_model/.*": 0.1}),
     r"lr_multipliers regex 'vision_model/\.\*' matches only frozen params; .* start with: "
     r"aligner/high_res_vision_proj, aligner/proj, aligner/vision_proj\.$"),
    (dict(stage="S3", lr_multipliers={"siglip/.*": 0.1}), r"'siglip/\.\*' matches no param"),
    (dict(stage="S3", lr_multipliers={"vision_model/.*": 0.1, ".*/layers/.*": 0.5}),
     r"The param 'vision_model/layers/\S+' is matched by two lr_multipliers regexes, 'vision_model/\.\*' and "
     r"'\.\*/layers/\.\*'"),
])
def test_param_errors(fields, match):
  config = opt_lib.OptimizerConfig(**_BASE, **fields)
  abstract = dvl_jax.abstract_params(dvl_jax.tiny_hybrid())
  with pytest.raises(ValueError, match=match):
    opt_lib.make_optimizer(config, abstract)
