"""train_step_flops (MaxText's count) against what the compiled train step computes, and against 6 N per token.

The compiled check: the dot and convolution FLOPs in the optimised HLO of the real jitted train step (abstract
shapes, no arrays) equal train_step_flops plus three things MaxText leaves out on purpose, each computed here:
- the masked half of the causal attention: at 40 tokens the decoder computes the whole square (causal_blocks
  is 1; longer rows skip part of it, never half), where MaxText counts half;
- SAM's bilinear resize (hybrid), which XLA:CPU runs as two small matmuls per path;
- remat: under "full", XLA recomputes each block's forward in the backward pass, except the block's last
  matmul (down_proj, fc2), whose output is the next block's saved input; only in blocks a gradient passes
  through (a frozen tower has no backward pass, hence nothing to recompute). MFU does not credit recompute.
The comparison is exact: a frozen tower counted x3 instead of x1, a frozen LLM x3 instead of x2, a missing
logits or aligner term, all fail it.
"""

import jax
import jax.numpy as jnp
import pytest

import dvl_jax
from dvl_jax.model import abstract_params
from dvl_jax.nn.attention import causal_blocks
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.training import Batch, OptimizerConfig, init_train_state, jit_train_step, paper_config, trainable_mask
from dvl_jax.training.flops import StepFlops, TrainedParts, hlo_matmul_flops, train_step_flops

ROWS, SEQ = 2, 40  # one image per row (16 tokens in tiny) + 24 text tokens


def _compiled_hlo(config, stage: str | OptimizerConfig, remat: str, objective: str = "next_token") -> str:
  """The optimised HLO text of jit_train_step for `stage` (or an OptimizerConfig), lowered on ShapeDtypeStructs."""
  optimizer = stage if isinstance(stage, OptimizerConfig) else paper_config(stage, total_steps=10, warmup_steps=0)
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(config))
  image = lambda size: jax.ShapeDtypeStruct((ROWS, 1, size, size, 3), jnp.float32)  # noqa: E731
  batch = Batch(input_ids=jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32),
                attention_mask=jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32),
                pixel_values=image(config.vision.image_size),
                high_res_pixel_values=image(config.high_res.image_size) if config.is_hybrid else None,
                image_labels=jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32) if objective == "region_words" else None)
  step = jit_train_step(DeepseekVL(config, remat_policy=remat), optimizer, chunk_size=None,  # plain loss
                        objective=objective)
  return step.lower(state, batch).compile().as_text()


def _resize(config) -> int:
  """SAM's bilinear resize of both neck outputs to 4x SigLIP's grid: one matmul per spatial axis, forward only."""
  g, c, s = config.high_res.grid_size, config.high_res.neck_dim, 4 * config.vision.grid_size
  return 2 * (2 * ROWS * s * g * g * c + 2 * ROWS * s * s * g * c)


def _recompute(config) -> int:
  """remat "full": each decoder layer's forward again but its last matmul (down_proj). Only the decoder: the
  towers are frozen in S2, so nothing of theirs is recomputed though their blocks are remat-wrapped too. (Under
  S3, SigLIP's blocks recompute the same way, fc2 left out.)"""
  c = config.text
  per_token = 2 * (c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                   + c.num_heads * c.head_dim * c.embed_dim + 2 * c.embed_dim * c.mlp_dim)  # no down_proj
  return c.num_layers * (per_token * ROWS * SEQ + 4 * ROWS * SEQ**2 * c.num_heads * c.head_dim)


# Three compiles (~5-20 s each): S3 compiles the slowest (SigLIP's backward), so it runs once, on the hybrid
# model; the non-hybrid S3 count is checked against parameter counts below.
CASES = {  # id: (config, stage, remat)
    "S1": (dvl_jax.tiny, "S1", "none"),
    "S2-remat-full": (dvl_jax.tiny, "S2", "full"),
    "S3-hybrid": (dvl_jax.tiny_hybrid, "S3", "none"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_compiled_steps_matmuls(case):
  make, stage, remat = CASES[case]
  config = make()
  assert causal_blocks(SEQ) == 1  # the decoder computes the whole causal square
  flops = train_step_flops(config, paper_config(stage, total_steps=10, warmup_steps=0), batch=ROWS, seq_len=SEQ)
  expected = flops.total + flops.attention  # the masked half is computed too
  if config.is_hybrid:
    expected += _resize(config)
  if remat == "full":
    expected += _recompute(config)
  compiled = hlo_matmul_flops(_compiled_hlo(config, stage, remat))
  print(f"\n{case}: compiled {compiled:.6g}, expected {expected:.6g}; {flops}")
  assert compiled == expected, (compiled - expected, flops)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["bag_of_words", "region_words"])
def test_vision_pretraining_runs_no_decoder_layer_and_equals_the_compiled_steps_matmuls(objective):
  """The tower and the aligner trained; lm_head (frozen) scores the pooled features at every position
  (bag_of_words) or every image token's features and one position more (region_words)."""
  config = dvl_jax.tiny()
  optimizer = OptimizerConfig(learning_rate=1e-3, total_steps=10, trainable=("vision_model/.*", "aligner/.*"))
  flops = train_step_flops(config, optimizer, batch=ROWS, seq_len=SEQ, objective=objective)
  assert flops.decoder_weights == flops.attention == 0 and flops.vision > 0
  scored = ROWS * (SEQ if objective == "bag_of_words" else config.tokens_per_image + 1)
  assert flops.logits == 2 * 2 * config.text.embed_dim * config.text.vocab_size * scored  # forward, input grad
  assert hlo_matmul_flops(_compiled_hlo(config, optimizer, "none", objective)) == flops.total


def test_trained_weights_cost_six_flops_per_param_and_token():
  """Everything trained (S3, non-hybrid): 2 FLOPs per multiply-add, x3, per kernel element and token that it
  multiplies; kernels counted from the params themselves. Norms, biases, embeddings are no matmuls."""
  config = dvl_jax.tiny()
  params = abstract_params(config)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  kernels = lambda tree: sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                             if jax.tree_util.keystr(p).endswith("['kernel']"))
  lm = params["language_model"]
  layers = kernels({k: v for k, v in lm.items() if k.startswith("layers_")})
  flops = train_step_flops(config, paper_config("S3", total_steps=10, warmup_steps=0), batch=ROWS, seq_len=SEQ)
  tokens, images, patches = ROWS * SEQ, ROWS, config.vision.num_patches
  assert flops.decoder_weights == 6 * layers * tokens
  assert flops.logits == 6 * size(lm["lm_head"]["kernel"]) * tokens
  assert flops.aligner == 6 * kernels(params["aligner"]) * patches * images
  v = config.vision
  blocks = 6 * kernels(params["vision_model"]["layers"]) * patches * images
  patch_embedding = 4 * size(params["vision_model"]["patch_embedding"]["kernel"]) * patches * images  # no dX
  attention = 3 * v.num_layers * 4 * patches**2 * v.embed_dim * images
  assert flops.vision == blocks + patch_embedding + attention


def test_stages_train_the_papers_parts_and_multiply_accordingly():
  config = dvl_jax.tiny()
  parts = {s: TrainedParts.from_optimizer(config, paper_config(s, total_steps=10, warmup_steps=0))
           for s in ("S1", "S2", "S3")}
  assert parts["S1"] == TrainedParts(aligner=True)
  assert parts["S2"] == TrainedParts(aligner=True, language_model=True)
  assert parts["S3"] == TrainedParts(vision=True, aligner=True, language_model=True)
  f = {s: train_step_flops(config, p, batch=ROWS, seq_len=SEQ) for s, p in parts.items()}
  forward = train_step_flops(config, TrainedParts(), batch=ROWS, seq_len=SEQ)
  assert f["S1"].decoder_weights == 2 * forward.decoder_weights  # frozen LLM: forward + dX
  assert f["S1"].logits == 2 * forward.logits
  assert f["S2"].decoder_weights == 3 * forward.decoder_weights
  assert f["S1"].attention == f["S2"].attention == 3 * forward.attention  # the gradient passes through it
  assert f["S1"].vision == f["S2"].vision == forward.vision  # frozen tower: forward only
  a, images = config.aligner, ROWS
  linear1, linear2 = (2 * n * a.out_dim * config.tokens_per_image * images for n in (a.in_dim, a.out_dim))
  assert forward.aligner == linear1 + linear2
  assert f["S2"].aligner == 2 * linear1 + 3 * linear2  # linear1's input, a frozen tower's output, needs no dX
  assert f["S3"].aligner == 3 * forward.aligner
  mask = trainable_mask(abstract_params(config), paper_config("S2", total_steps=10, warmup_steps=0))
  assert train_step_flops(config, mask, batch=ROWS, seq_len=SEQ) == f["S2"]


def test_hybrid_sam_is_forward_only_in_every_stage():
  config = dvl_jax.tiny_hybrid()
  forward = train_step_flops(config, TrainedParts(), batch=ROWS, seq_len=SEQ)
  s3 = train_step_flops(config, paper_config("S3", total_steps=10, warmup_steps=0), batch=ROWS, seq_len=SEQ)
  siglip = train_step_flops(dvl_jax.tiny(), TrainedParts(), batch=ROWS, seq_len=SEQ).vision
  sam = forward.vision - siglip
  assert sam > 0 and s3.vision - sam == train_step_flops(
      dvl_jax.tiny(), TrainedParts(vision=True), batch=ROWS, seq_len=SEQ).vision


def test_rates_and_errors():
  f = StepFlops(decoder_weights=6e12, attention=1e12, logits=2e12, vision=0.5e12, aligner=0.5e12, tokens=4864,
                images=8)
  assert f.total == 10e12 and f.per_second(2.0) == 5e12
  assert f.mfu(2.0, 10e12) == 0.5
  assert f.tokens_per_second(2.0) == 2432 and f.images_per_second(2.0) == 4
  config = dvl_jax.tiny()
  with pytest.raises(ValueError, match="do not fit in seq_len=10"):
    train_step_flops(config, TrainedParts(), batch=1, seq_len=10)
  with pytest.raises(ValueError, match="batch and seq_len must be positive ints"):
    train_step_flops(config, TrainedParts(), batch=0, seq_len=40)
  with pytest.raises(ValueError, match=r"top-level keys \['vision_tower'\]"):
    TrainedParts.from_mask({"vision_tower": True})


def test_hlo_count_multiplies_loop_bodies_by_their_trip_count():
  """cost_analysis() counts a loop body once; hlo_matmul_flops as often as it runs."""
  w = jax.ShapeDtypeStruct((5, 32, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((8, 32), jnp.float32)

  def f(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi[:, :32]), None), x, w)[0]

  compiled = jax.jit(f).lower(w, x).compile()
  assert hlo_matmul_flops(compiled.as_text()) == 5 * 2 * 8 * 32 * 32
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  text = conv.lower(jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32),
                    jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)).compile().as_text()
  assert hlo_matmul_flops(text) == 2 * (2 * 4 * 4 * 6) * 9 * 4  # out pixels x channels, 3x3x4 taps each

  def dynamic(x):
    return jax.lax.while_loop(lambda c: jnp.sum(c[1]) < 100.0, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]

  loop = jax.jit(dynamic).lower(jax.ShapeDtypeStruct((4, 4), jnp.float32)).compile().as_text()
  with pytest.raises(ValueError, match="without a known trip count"):
    hlo_matmul_flops(loop)
  cost = compiled.cost_analysis()
  assert float((cost[0] if isinstance(cost, list) else cost)["flops"]) < hlo_matmul_flops(compiled.as_text())
