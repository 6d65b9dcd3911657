"""dvl_jax.sharding on 8 simulated CPU devices (tests/conftest.py): meshes, rules, param and cache shardings,
and sharded runs equal to the single-device run."""

import re
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dvl_jax
from dvl_jax import checkpoint, sharding
from dvl_jax.nn import attention
from dvl_jax.sharding import MeshSpec, ShardingPlan, make_mesh

# (mesh, the strategy it defaults to): each strategy, and a 2 x 2 x 2 mesh.
MESHES = [("data=8", "data"), ("fsdp=8", "fsdp"), ("data=4,tensor=2", "tensor"), ("fsdp=4,tensor=2", "fsdp_tensor"),
          ("data=2,fsdp=2,tensor=2", "fsdp_tensor")]


def test_there_are_eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"


def test_mesh_spec_fills_the_devices():
  assert MeshSpec.parse("data=2,fsdp=-1").sizes(8) == (2, 4, 1)
  assert MeshSpec.parse({"tensor": 2}).sizes(8) == (4, 1, 2)  # data takes the rest when no axis says -1
  assert MeshSpec.parse("fsdp=-1").sizes(8) == (1, 8, 1)
  assert MeshSpec.parse("").sizes(8) == (8, 1, 1)
  mesh = make_mesh("data=2,fsdp=2,tensor=2")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert list(mesh.devices.flat) == jax.devices()


@pytest.mark.parametrize("spec, message", [
    ("data=3", r"needs 3 devices, but 8 are available"),
    ("data=3,fsdp=-1", r"take 3 devices, which does not divide the 8 devices"),
    ("data=-1,fsdp=-1", r"at most one -1"),
    ("data=0", r"sizes must be positive"),
    ("dat=2", r"unknown axes \['dat'\]; the mesh axes are \['data', 'fsdp', 'tensor'\]"),
    ("data:2", r"'data:2' is not axis=size"),
])
def test_mesh_spec_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(spec)


def test_strategy_errors():
  with pytest.raises(ValueError, match=r"Unknown strategy 'zero3'; choose one of \['data', 'fsdp', 'fsdp_tensor'"):
    ShardingPlan("fsdp=8", strategy="zero3")
  with pytest.raises(ValueError, match=r"Strategy 'data' leaves mesh axis tensor=2 unused.*'tensor'"):
    ShardingPlan("data=4,tensor=2", strategy="data")
  with pytest.raises(ValueError, match=r"rules name logical axis 'hidden', which the model does not use"):
    ShardingPlan("tensor=8", strategy={"batch": "data", "hidden": "tensor"})
  with pytest.raises(ValueError, match=r"map 'heads' to \['model'\], which are not mesh axes"):
    ShardingPlan("tensor=8", strategy={"heads": "model"})


def test_two_logical_axes_on_one_mesh_axis_are_refused():
  plan = ShardingPlan("data=4,tensor=2", strategy={"batch": ("data", "fsdp"), "heads": "tensor", "embed": "tensor"})
  with pytest.raises(ValueError, match=r"o_proj'\]\['kernel'\]: logical axes 'embed' and 'heads' both map to mesh axis 'tensor'"):
    dvl_jax.model.param_shardings(dvl_jax.tiny(), plan)


def _with_text(config, **changes):
  return config.replace(text=dvl_jax.LlamaConfig(**{**config.text.__dict__, **changes}))


def _uneven_warnings(record) -> list[str]:
  return [str(w.message) for w in record if issubclass(w.category, sharding.UnevenShardingWarning)]


def test_the_vocabulary_is_padded_to_a_multiple_of_its_shards():
  assert ShardingPlan("data=2,fsdp=2,tensor=2").padded_vocab_size(305) == 306
  assert ShardingPlan("tensor=8").padded_vocab_size(305) == 312
  assert ShardingPlan("tensor=8").padded_vocab_size(32000) == 32000
  assert ShardingPlan("fsdp=8").padded_vocab_size(305) == 305  # the vocabulary is not split: nothing to pad
  # The params' rows over tensor (2), the logits' vocab over fsdp x tensor (4): a multiple of both.
  rules = {**sharding.STRATEGIES["fsdp_tensor"], "act_vocab": ("fsdp", "tensor")}
  assert ShardingPlan("data=2,fsdp=2,tensor=2", strategy=rules).padded_vocab_size(305) == 308
  config = _with_text(dvl_jax.tiny(), vocab_size=305)
  plan = ShardingPlan("data=2,fsdp=2,tensor=2")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model_layout = dvl_jax.model.param_shardings(config, plan)["language_model"]
    target = dvl_jax.abstract_params(config, plan)["language_model"]
  assert not _uneven_warnings(record)  # padded, so nothing is replicated
  assert model_layout["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert model_layout["lm_head"]["kernel"].spec == P("tensor", "fsdp")
  # A checkpoint stores the real vocabulary; it is restored with its rows whole, then padded by Model.
  assert target["embed_tokens"]["embedding"].shape == (305, 64)
  assert target["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")


def test_a_dimension_that_does_not_divide_is_replicated_with_a_warning():
  # The decoder's 4 heads split 4 ways, SigLIP's 2 do not: they stay whole, and the warning says how to split them.
  config = _with_text(dvl_jax.tiny(), num_kv_heads=4)
  plan = ShardingPlan("data=2,tensor=4")
  with pytest.warns(sharding.UnevenShardingWarning) as record:
    shardings = dvl_jax.model.param_shardings(config, plan)
    dvl_jax.model.param_shardings(config, plan)  # warned once per plan, not per call
  messages = _uneven_warnings(record)
  q = [m for m in messages if "['vision_model']['layers']['self_attn']['q_proj']['kernel']" in m]
  assert len(q) == 1, messages
  assert re.search(r"has shape \(2, 2, 16, 32\): dimension 1 \('heads', size 2\) does not divide over mesh axes "
                   r"tensor of size 4, so that dimension is replicated.*Another vision_strategy", q[0]), q[0]
  assert len(messages) == len(set(messages))
  assert all("vision_model" in m or "aligner" in m for m in messages), messages
  assert shardings["vision_model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, None, None, None)
  assert shardings["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec == P("tensor", None, None)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    dvl_jax.model.param_shardings(config, ShardingPlan("data=2,tensor=4", vision_strategy="data"))
  assert not _uneven_warnings(record)


def test_a_batch_that_does_not_divide_is_refused():
  # Replicating the batch would have every device compute every row; Model pads it instead.
  plan = ShardingPlan("data=2,fsdp=2,tensor=2")
  with pytest.raises(ValueError, match=r"A batch of 3 rows per process has shape \(3, 4\): dimension 0 \('batch', "
                                       r"size 3\) does not divide over mesh axes dataxfsdp of size 4\. Pad it"):
    plan.put_batch(np.zeros((3, 4), np.int32))


def test_place_pads_the_rows_and_lays_them_out():
  plan = ShardingPlan("data=2,fsdp=2,tensor=2")  # 4 batch shards
  assert plan.agree_batch(3, 7, 2) == (4, 7, 2)  # one process: its own sizes, the rows rounded up
  ids = np.arange(3 * 5, dtype=np.int32).reshape(3, 5)
  weights = np.ones((3, 5), np.float32)
  heads = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
  out = plan.place({"ids": ids, "weights": weights, "heads": heads, "none": None},
                   axes={"heads": ("batch", "act_heads")}, fill={"weights": 0})
  assert out["none"] is None
  assert out["ids"].shape == (4, 5) and out["ids"].sharding.spec == P(("data", "fsdp"), None)
  assert out["heads"].sharding.spec == P(("data", "fsdp"), "tensor", None)
  assert {s.data.shape for s in out["heads"].addressable_shards} == {(1, 2, 2)}
  np.testing.assert_array_equal(np.asarray(out["ids"]), np.concatenate([ids, ids[-1:]]))  # the last row copied
  np.testing.assert_array_equal(np.asarray(out["weights"]), np.concatenate([weights, np.zeros((1, 5))]))
  assert plan.place({"ids": ids}, rows=8)["ids"].shape == (8, 5)
  with pytest.raises(ValueError, match=r"axis 0 must be the batch, the same rows in each; got \{'a': \(3, 5\), "
                                       r"'b': \(2, 5\)\}"):
    plan.place({"a": ids, "b": ids[:2]})
  with pytest.raises(ValueError, match=r"3 rows cannot be padded to rows=6; it must be at least 3 and a multiple of 4"):
    plan.place({"ids": ids}, rows=6)
  with pytest.raises(ValueError, match=r"axes or fill name \['mask'\], which are not among the arrays \['ids'\]"):
    plan.place({"ids": ids}, fill={"mask": 0})


def test_plan_jit_lays_out_activations_without_activate():
  plan = ShardingPlan("data=4,tensor=2")

  def fn(x, scale):
    return sharding.constrain(x * scale, ("batch", "act_heads"))

  run = plan.jit(fn, static_argnames=("scale",))  # names resolve through fn's signature
  out = run(np.ones((8, 6), np.float32), scale=2)
  assert sharding.active_plan() is None
  assert out.sharding.is_equivalent_to(plan.sharding(("batch", "act_heads")), 2)
  assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(out), 2)
  assert jax.jit(fn, static_argnames=("scale",))(np.ones((8, 6), np.float32), scale=2).sharding.num_devices == 1


def _optimizer_and_state(config):
  from dvl_jax.training.optimizer import OptimizerConfig, make_optimizer

  params = dvl_jax.abstract_params(config)
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10, stage="S2"), params)
  return params, tx, jax.eval_shape(tx.init, params)


def test_optimizer_state_is_sharded_like_its_params():
  config = dvl_jax.tiny()
  plan = ShardingPlan("data=2,fsdp=2,tensor=2")
  params, tx, state = _optimizer_and_state(config)
  shardings = dvl_jax.model.state_shardings(config, plan, state)
  wanted = dvl_jax.model.param_shardings(config, plan)
  adam = state[1].inner_states["trainable"].inner_state[0]  # clip's and the frozen params' states are empty
  got = shardings[1].inner_states["trainable"].inner_state[0]
  assert got.count.spec == P()
  for moment in ("mu", "nu"):
    leaves = jax.tree_util.tree_leaves_with_path(getattr(got, moment))
    assert len(leaves) == len(jax.tree.leaves(getattr(adam, moment))) > 0
    for path, s in leaves:
      want = wanted
      for key in path:
        want = want[key.key]
      assert s.spec == want.spec, (moment, jax.tree_util.keystr(path))
  assert got.mu["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec == P("tensor", None, "fsdp")
  assert not jax.tree.leaves(got.mu["vision_model"])  # frozen in S2: MaskedNodes, no moments
  # The same from the Model's own arrays, and a state array that mirrors no param is refused.
  assert jax.tree.leaves(plan.state_shardings(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                           params, wanted), state)) == jax.tree.leaves(shardings)
  with pytest.raises(ValueError, match=r"1 state array\(s\) mirror no param.*\n  \['extra'\]\['kernel'\] \(3, 4\)"):
    plan.state_shardings(params | {"aligner": {}}, {"extra": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}})


def test_optimizer_state_is_created_in_its_shards():
  config = dvl_jax.tiny()
  plan = ShardingPlan("data=4,tensor=2")
  params, tx, state = _optimizer_and_state(config)
  param_shardings = dvl_jax.model.param_shardings(config, plan)
  zeros = jax.jit(lambda: jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), params),
                  out_shardings=param_shardings)()
  opt_state = jax.jit(tx.init, out_shardings=dvl_jax.model.state_shardings(config, plan, state))(zeros)
  mu = opt_state[1].inner_states["trainable"].inner_state[0].mu
  q = mu["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [heads 4, head_dim 16, embed 64]
  assert q.sharding.spec == P("tensor", None, None)
  assert [s.data.shape for s in q.addressable_shards] == [(2, 16, 64)] * 8  # each device: half


def _kernel(params, *path):
  for key in path:
    params = params[key]
  return params["kernel"]


def test_param_and_cache_shardings_follow_the_rules():
  config = dvl_jax.tiny()  # 4 heads, 2 kv heads, head_dim 16, embed 64, mlp 128, vocab 256
  plan = ShardingPlan("data=4,tensor=2")
  model = dvl_jax.Model(config, dvl_jax.init_params(config), plan=plan)
  text = model.params["language_model"]
  for i in range(config.text.num_layers):
    attn = text[f"layers_{i}"]["self_attn"]
    for name, spec in [("q_proj", P("tensor", None, None)), ("k_proj", P("tensor", None, None)),
                       ("v_proj", P("tensor", None, None)), ("o_proj", P(None, "tensor", None))]:
      kernel = attn[name]["kernel"]
      assert kernel.sharding.spec == spec, name
      assert len(kernel.addressable_shards) == 8
      assert all(s.data.size * 2 == kernel.size for s in kernel.addressable_shards), name  # each device: half
  assert [s.data.shape for s in _kernel(text, "layers_0", "self_attn", "q_proj").addressable_shards] == [(2, 16, 64)] * 8
  assert _kernel(text, "layers_0", "mlp", "gate_proj").addressable_shards[0].data.shape == (64, 64)
  assert _kernel(text, "layers_0", "mlp", "down_proj").addressable_shards[0].data.shape == (64, 64)
  assert text["embed_tokens"]["embedding"].addressable_shards[0].data.shape == (128, 64)
  assert text["norm"]["scale"].sharding.spec == P(None)  # replicated: no rule shards embed without fsdp

  cache = model.init_cache(batch_size=4, max_len=16)
  assert cache.k[0].shape == (4, 2, 16, 16)
  assert {s.data.shape for s in cache.k[1].addressable_shards} == {(1, 1, 16, 16)}  # a row and a kv head each
  assert {s.data.shape for s in cache.valid.addressable_shards} == {(1, 16)}

  fsdp = ShardingPlan("fsdp=4,tensor=2")
  q = dvl_jax.model.param_shardings(config, fsdp)["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P("tensor", None, "fsdp")
  assert q.shard_shape((4, 16, 64)) == (2, 16, 16)
  siglip_q = dvl_jax.model.param_shardings(config, fsdp)["vision_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert siglip_q.spec == P(None, "tensor", None, "fsdp")  # scanned: [layers, heads, head_dim, embed]


@pytest.mark.slow
def test_init_params_creates_each_param_in_its_shards():
  config = dvl_jax.tiny()
  plan = ShardingPlan("fsdp=4,tensor=2")
  sharded = dvl_jax.init_params(config, seed=3, plan=plan)
  single = dvl_jax.init_params(config, seed=3)
  want = dvl_jax.model.param_shardings(config, plan)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"), sharded,
               want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)


def test_load_restores_into_shards(tmp_path):
  config = dvl_jax.tiny()
  params = dvl_jax.init_params(config, seed=4)
  checkpoint.save(tmp_path / "ckpt", params, config)
  model = dvl_jax.load(tmp_path / "ckpt", mesh="fsdp=8")
  assert model.plan.strategy == "fsdp"
  embedding = model.params["language_model"]["embed_tokens"]["embedding"]
  assert embedding.sharding.spec == P(None, "fsdp")
  assert embedding.addressable_shards[0].data.shape == (256, 8)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), model.params, params)


def _inputs(config, seed=0):
  """3 rows (so every mesh pads the batch) with 2, 0 and 1 images; row 1 left-padded."""
  rng = np.random.default_rng(seed)
  per = config.tokens_per_image
  ids = rng.integers(0, config.image_token_id, (3, 2 * per + 12)).astype(np.int32)
  ids[0, 2:2 + per] = ids[0, 4 + per:4 + 2 * per] = config.image_token_id
  ids[2, 5:5 + per] = config.image_token_id
  mask = np.ones_like(ids)
  mask[1, :7] = 0
  s = config.vision.image_size
  out = dict(input_ids=ids, attention_mask=mask, pixel_values=rng.normal(size=(3, 2, s, s, 3)).astype(np.float32))
  if config.is_hybrid:
    s = config.high_res.image_size
    out["high_res_pixel_values"] = rng.normal(size=(3, 2, s, s, 3)).astype(np.float32)
  return out


@pytest.fixture(scope="module", params=["tiny", "tiny-hybrid"])
def single_device_run(request):
  config = dvl_jax.preset(request.param)
  params = dvl_jax.init_params(config, seed=1)
  model = dvl_jax.Model(config, params)
  inputs = _inputs(config)
  return config, params, inputs, np.asarray(model(**inputs)), model.generate(**inputs, max_new_tokens=6)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, strategy", MESHES)
def test_sharded_run_equals_single_device(single_device_run, mesh, strategy):
  config, params, inputs, logits, generated = single_device_run
  model = dvl_jax.Model(config, params, plan=ShardingPlan(mesh))
  assert model.plan.strategy == strategy
  got = model(**inputs)
  real = inputs["attention_mask"].astype(bool)  # padding positions' logits are never used, and differ
  assert got.shape == logits.shape
  np.testing.assert_allclose(np.asarray(got)[real], logits[real], rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  out = model.generate(**inputs, max_new_tokens=6)
  np.testing.assert_array_equal(out.tokens, generated.tokens)
  np.testing.assert_array_equal(out.lengths, generated.lengths)


def test_vision_towers_can_use_another_strategy(single_device_run):
  config, params, inputs, logits, generated = single_device_run
  model = dvl_jax.Model(config, params, plan=ShardingPlan("fsdp=4,tensor=2", vision_strategy="data"))
  vision_q = model.params["vision_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert vision_q.sharding.spec == P(None, None, None, None)
  real = inputs["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(model(**inputs))[real], logits[real], rtol=1e-5,
                             atol=1e-5 * np.abs(logits).max())
  np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=6).tokens, generated.tokens)


def test_tiled_attention_sharded_equals_single_device(single_device_run, monkeypatch):
  # With no logits budget every attention with as many queries as head dims (SigLIP's, the decoder's prefill)
  # runs a row and a kv head at a time, under shard_map with rows and heads split over the mesh.
  config, params, inputs, logits, generated = single_device_run
  if config.is_hybrid:
    pytest.skip("the same tiled attention as the tiny model's (SAM's, with its bias, is not tiled); the hybrid "
                "costs 2 more minutes")
  monkeypatch.setattr(attention, "LOGITS_BUDGET", 0)
  model = dvl_jax.Model(config, params, plan=ShardingPlan("data=2,fsdp=2,tensor=2"))
  real = inputs["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(model(**inputs))[real], logits[real], rtol=1e-5,
                             atol=1e-5 * np.abs(logits).max())
  np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=6).tokens, generated.tokens)


def test_per_shard_runs_on_each_devices_rows():
  plan = ShardingPlan("data=4,tensor=2")
  seen = []

  def fn(x, maybe):
    seen.append((x.shape, maybe))
    return jax.lax.map(lambda row: row * 2, x)  # a loop over the rows it is given

  run = sharding.per_shard(fn, in_axes=(("batch", "act_heads"), None), out_axes=("batch", "act_heads"))
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  np.testing.assert_array_equal(run(x, None), x * 2)  # no plan: fn on the whole array
  with plan.activate():
    out = jax.jit(run)(jax.device_put(x, plan.sharding(("batch", "act_heads"))), None)
  np.testing.assert_array_equal(out, x * 2)
  # Traced abstractly on the whole array (the result's shape), then run on 4 batch shards of 2 rows x 2 head
  # shards of 3.
  assert seen == [((8, 6), None), ((8, 6), None), ((2, 3), None)]
  assert out.sharding.spec == P(("data", "fsdp"), "tensor")


def test_data_parallel_prefill_gathers_no_activations():
  # Attention loops over rows (lax.map). Each device must loop over its own rows: a loop over the global batch
  # has XLA gather every row onto every device first (this checks the compiled program for it).
  config = dvl_jax.tiny()
  plan = ShardingPlan("data=8")
  model = dvl_jax.Model(config, dvl_jax.init_params(config, plan=plan), plan=plan)
  b, t = 8, 96  # long enough for the causal blocks of a prefill
  x = np.zeros((b, t, config.text.embed_dim), np.float32)
  positions, mask = np.broadcast_to(np.arange(t), (b, t)), np.ones((b, t), np.int32)

  def prefill(params, x, cache):
    return model.module.apply({"params": params}, x, positions, mask, cache,
                              method=lambda m, *args: m.language_model(*args))

  with plan.activate():
    cache = model.init_cache(b, t + 8)
    hlo = jax.jit(prefill).lower(model.params, plan.put_batch(x, ("batch", None, None)), cache).compile().as_text()
  assert cache.empty
  assert "all-gather" not in hlo and "all-reduce" not in hlo


def _assert_same_run(model, inputs, logits, generated):
  real = inputs["attention_mask"].astype(bool)
  got = np.asarray(model(**inputs))
  assert got.shape == logits.shape
  np.testing.assert_allclose(got[real], logits[real], rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  out = model.generate(**inputs, max_new_tokens=6, repetition_penalty=1.3)
  np.testing.assert_array_equal(out.tokens, generated.tokens)


def _single_device_run(config, seed=1):
  params = dvl_jax.init_params(config, seed=seed)
  inputs = _inputs(config)
  v = config.text.vocab_size
  last = [i for i in range(v - 3, v) if i != config.image_token_id]  # the embedding's last rows too
  inputs["input_ids"][:, -len(last):] = last
  model = dvl_jax.Model(config, params)
  return params, inputs, np.asarray(model(**inputs)), model.generate(**inputs, max_new_tokens=6,
                                                                      repetition_penalty=1.3)


@pytest.mark.slow
def test_an_uneven_vocabulary_is_padded_and_equals_one_device(tmp_path):
  config = _with_text(dvl_jax.tiny(), vocab_size=305)  # 306 rows on a 2 x 2 x 2 mesh
  params, inputs, logits, generated = _single_device_run(config)
  checkpoint.save(tmp_path / "ckpt", params, config)  # the real vocabulary on disk
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model = dvl_jax.load(tmp_path / "ckpt", mesh="data=2,fsdp=2,tensor=2")
    _assert_same_run(model, inputs, logits, generated)
  assert not _uneven_warnings(record)
  for name in ("embed_tokens", "lm_head"):
    weights = next(iter(model.params["language_model"][name].values()))
    assert weights.shape == (306, 64) and weights.sharding.spec == P("tensor", "fsdp"), name
    np.testing.assert_array_equal(np.asarray(weights)[:305], next(iter(params["language_model"][name].values())))
    assert not np.asarray(weights)[305:].any(), name


@pytest.mark.filterwarnings("ignore::dvl_jax.sharding.UnevenShardingWarning")  # the tiny heads do not split 8 ways
@pytest.mark.slow
def test_sampling_never_picks_a_padded_id():
  config = _with_text(dvl_jax.tiny(), vocab_size=305)
  plan = ShardingPlan("tensor=8")  # 312 rows: 7 padded ids
  model = dvl_jax.Model(config, dvl_jax.init_params(config, seed=2, plan=plan), plan=plan)
  assert model.params["language_model"]["lm_head"]["kernel"].shape == (312, 64)
  ids = np.random.default_rng(0).integers(0, 255, (3, 8)).astype(np.int32)
  # At this temperature every real id is about equally likely: unmasked, the padded ids (whose zero rows give
  # logit 0) would be drawn about 7 times in these 300 tokens.
  out = model.generate(ids, max_new_tokens=100, do_sample=True, temperature=1e4, seed=3)
  assert out.tokens.max() < 305
  assert len(np.unique(out.tokens)) > 150  # the draws do spread over the vocabulary


@pytest.mark.slow
def test_a_param_dimension_that_does_not_divide_is_replicated_and_equals_one_device(monkeypatch):
  config = _with_text(dvl_jax.tiny(), num_kv_heads=1)  # one kv head over tensor=2
  params, inputs, logits, generated = _single_device_run(config)
  monkeypatch.setattr(attention, "LOGITS_BUDGET", 0)  # the tiled attention too: per_shard with a head whole
  with pytest.warns(sharding.UnevenShardingWarning) as record:
    model = dvl_jax.Model(config, params, plan=ShardingPlan("data=2,fsdp=2,tensor=2"))
    _assert_same_run(model, inputs, logits, generated)
  messages = _uneven_warnings(record)
  assert len(messages) == len(set(messages)), "each param or activation is warned about once"
  k = [m for m in messages if m.startswith("Param ['language_model']['layers_1']['self_attn']['k_proj']['kernel']")]
  assert len(k) == 1 and re.match(r".* has shape \(1, 16, 64\): dimension 0 \('kv_heads', size 1\) does not "
                                  r"divide over mesh axes tensor of size 2, so that dimension is replicated", k[0])
  assert any(m.startswith("Activation ('batch', 'act_kv_heads', 'cache_seq', 'head_dim')") for m in messages)
  kernel = model.params["language_model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, None, "fsdp")
