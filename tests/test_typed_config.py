"""YAML -> dataclasses: types, overrides, and errors that name the key, on a small tree and on the data config."""

import dataclasses

import pytest

from dvl_jax.data import DataConfig, SourceConfig
from dvl_jax.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
  learning_rate: float
  schedule: str = "cosine"
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  optim: Optim
  steps: int = 10
  shapes: tuple[int, ...] = (1, 2)
  tags: dict[str, str] = dataclasses.field(default_factory=dict)
  data: DataConfig | None = None


YAML = """
name: s3
optim: {learning_rate: 2, clip_norm: null}
shapes: [256, 512]
data:
  batch_size: 8
  sources:
    - {path: a.jsonl, format: captions, weight: 3}
    - {path: b.parquet, format: text}
"""


def _raw(tmp_path, text=YAML):
  path = tmp_path / "run.yaml"
  path.write_text(text)
  return load_yaml(path)


def test_yaml_to_typed_dataclasses_and_back(tmp_path):
  run = from_dict(Run, _raw(tmp_path))
  assert run.optim == Optim(learning_rate=2.0, clip_norm=None) and isinstance(run.optim.learning_rate, float)
  assert run.shapes == (256, 512) and run.steps == 10
  assert run.data.sources[0] == SourceConfig("a.jsonl", "captions", weight=3.0)
  assert run.data.sources[1].format == "text" and run.data.buckets[-1] == run.data.seq_len
  assert from_dict(Run, to_dict(run)) == run


def test_overrides_reach_nested_keys_and_list_items(tmp_path):
  raw = apply_overrides(_raw(tmp_path), ["steps=2000", "optim.schedule=step", "data.sources.0.path=my.jsonl",
                                         "data.sources.2={path: c.jsonl, format: text}", "tags.owner=me",
                                         "name='007'", "optim.clip_norm=0.5"])
  run = from_dict(Run, raw)
  assert (run.steps, run.optim.schedule, run.name, run.optim.clip_norm) == (2000, "step", "007", 0.5)
  assert [s.path for s in run.data.sources] == ["my.jsonl", "b.parquet", "c.jsonl"]
  assert run.tags == {"owner": "me"}
  raw_again = _raw(tmp_path)
  apply_overrides(raw_again, ["name=other"])
  assert raw_again["name"] == "s3"  # overrides change a copy


def test_numbers_in_exponent_form_are_numbers_without_a_dot(tmp_path):
  """PyYAML (YAML 1.1) reads 1e-3 as a string; a config or an override reads it as the float a user means."""
  raw = _raw(tmp_path, YAML.replace("learning_rate: 2", "learning_rate: 3e-4"))
  assert from_dict(Run, raw).optim.learning_rate == 3e-4
  run = from_dict(Run, apply_overrides(raw, ["optim.learning_rate=2E-3", "optim.clip_norm=1e0", "name=1e3x"]))
  assert (run.optim.learning_rate, run.optim.clip_norm, run.name) == (2e-3, 1.0, "1e3x")


@pytest.mark.parametrize("override, message", [
    ("optim.learnig_rate=1", r"optim.learnig_rate: unknown key. Did you mean 'learning_rate'\? The keys of optim "
                             r"\(Optim\) are: learning_rate, schedule, clip_norm."),
    ("stpes=5", r"stpes: unknown key. Did you mean 'steps'\?"),
    ("steps=many", r"steps: expected an integer, got 'many' \(str\)."),
    ("steps=1.5", r"steps: expected an integer, got 1.5 \(float\)."),
    ("optim.clip_norm=yes", r"optim.clip_norm: expected a number, got True \(bool\)."),
    ("shapes=4", r"shapes: expected a list \(tuple\[int, \.\.\.\]\), got 4 \(int\)."),
    ("optim.learning_rate=-1", r"optim: learning_rate must be > 0, got -1.0"),
    ("data.sources.0.format=caption", r"data.sources.0: .*format='caption' is not one of"),
    ("data.sources.5.path=x", r"'data.sources.5' indexes a list of 2 item\(s\): use an index from 0 to 1, or 2"),
    ("steps", r"Override 'steps' is not key=value"),
    ("name.first=x", r"'name' is the value 's3', which has no keys"),
])
def test_each_mistake_names_the_key_the_value_and_what_is_valid(tmp_path, override, message):
  with pytest.raises(ConfigError, match=message):
    from_dict(Run, apply_overrides(_raw(tmp_path), [override]))


def test_missing_keys_and_bad_files(tmp_path):
  with pytest.raises(ConfigError, match=r"the config \(Run\) needs 'optim'"):
    from_dict(Run, {"name": "x"})
  with pytest.raises(ConfigError, match=r"does not exist"):
    load_yaml(tmp_path / "nope.yaml")
  with pytest.raises(ConfigError, match=r"is not valid YAML"):
    _raw(tmp_path, "name: [unclosed")
  with pytest.raises(ConfigError, match=r"must hold a mapping of keys at the top, not a list"):
    _raw(tmp_path, "- a\n- b\n")
