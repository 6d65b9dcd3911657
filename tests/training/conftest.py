import pytest

from reference import converted, hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(a tiny random transformers DeepSeek-VL ("gqa"), ours converted from it as a user's checkpoint)."""
  ref = hf_model("gqa")
  return ref, converted(ref, tmp_path_factory)
