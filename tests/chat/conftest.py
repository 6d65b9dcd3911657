"""Fixtures of the chat tests: the shipped model, and a model that never ends its answers."""

import dataclasses

import numpy as np
import pytest

import dvl_jax


@pytest.fixture(scope="session")
def shipped():
  """(model, processor) of the shipped shapes captioner."""
  path = dvl_jax.default_checkpoint()
  return dvl_jax.load(path), dvl_jax.Processor.from_pretrained(path)


@pytest.fixture(scope="session")
def never_ending_ckpt(tmp_path_factory):
  """A random model of the shapes captioner's size and tokenizer whose EOS logit is always 0 (its lm_head row is
  zero): greedy decoding never picks it (other logits reach about +0.8), so every greedy answer runs to its
  length limit. 8192 positions: answers of up to 4096 tokens, long enough (10 s and more) to be stopped."""
  from dvl_jax.training.export import export_params

  shapes = dvl_jax.shapes()
  config = shapes.replace(text=dataclasses.replace(shapes.text, max_position_embeddings=8192))
  params = dvl_jax.init_params(config, seed=1)
  eos = dvl_jax.GenerationConfig.read(dvl_jax.default_checkpoint()).eos_token_id[0]
  head = np.array(params["language_model"]["lm_head"]["kernel"])
  head[eos] = 0
  params["language_model"]["lm_head"]["kernel"] = head
  out = str(tmp_path_factory.mktemp("never-ending") / "ckpt")
  export_params(params, config, dvl_jax.default_checkpoint(), out, log=lambda _: None)
  return out
