"""YAML experiments -> frozen dataclasses, with `key.sub=value` overrides and errors that name the key.

  raw = load_yaml("configs/deepseek-vl-1.3b/stage3_sft.yaml")
  raw = apply_overrides(raw, ["data.sources.0.path=my.jsonl", "train.steps=2000"])
  config = from_dict(ExperimentConfig, raw)

A dataclass field's type hint says what a value may be: bool, int, float, str, None, `X | None`, tuple[X, ...],
tuple[X, Y], list[X], dict / Mapping[str, X], Literal[...] and nested dataclasses (from a mapping). YAML's own
types come through as they are, except that an int is taken for a float, a list for a tuple, and a mapping for a
tuple of (key, value) pairs. Anything else is
an error that names the key's full path, the value, and what was expected; an unknown key names the valid keys
and the nearest one. The dataclasses' own __post_init__ checks run as they are made, their errors prefixed with
the key. `to_dict` gives the plain dict back (for saving the resolved config).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
  """A config that does not fit its dataclasses; the message names the key."""


class _Loader(yaml.SafeLoader):
  """PyYAML's safe loader, reading numbers as YAML 1.2 (and Python) do: `1e-3` is a float, not the string that
  YAML 1.1's float pattern, which wants a dot (`1.0e-3`), makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text_or_file: Any) -> Any:
  return yaml.load(text_or_file, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """A YAML file's top-level mapping. Raises ConfigError for a missing file, bad YAML or a non-mapping."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    try:
      data = _yaml(f)
    except yaml.YAMLError as e:
      raise ConfigError(f"Config file {path!r} is not valid YAML: {e}") from e
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"Config file {path!r} must hold a mapping of keys at the top, not a {type(data).__name__}.")
  return data


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
  """`key.sub=value` overrides applied to a copy of `data`; a list item by its index (`sources.0.path=x`), or one
  past the end to append. Values are read as YAML (`steps=10` an int, `name='10'` a string, `x=null` None,
  `buckets=[256, 512]` a list). Keys that do not exist yet are added (`samples.0.image=x` makes the list):
  `from_dict` then says if they are unknown.
  """
  data = _copy(data)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"Override {item!r} is not key=value (e.g. train.steps=2000 or data.sources.0.path=x.jsonl).")
    try:
      value = _yaml(text)
    except yaml.YAMLError as e:
      raise ConfigError(f"Override {item!r}: the value is not valid YAML ({e}); quote a string with odd characters.")
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
      last = depth == len(parts) - 1
      where = ".".join(parts[:depth + 1])
      if isinstance(node, list):
        if not part.isdigit() or int(part) > len(node):
          raise ConfigError(f"Override {item!r}: {where!r} indexes a list of {len(node)} item(s): use an index from 0 "
                            f"to {len(node) - 1}, or {len(node)} to append.")
        i = int(part)
        if i == len(node):
          node.append(None if last else {})
        if last:
          node[i] = value
        else:
          node[i] = {} if node[i] is None else node[i]
          node = node[i]
      elif isinstance(node, dict):
        if last:
          node[part] = value
        else:
          if node.get(part) is None:  # absent, or null in the YAML: now given sub-keys (a list for an index)
            node[part] = [] if parts[depth + 1] == "0" else {}
          node = node[part]
      else:
        raise ConfigError(f"Override {item!r}: {'.'.join(parts[:depth])!r} is the value {node!r}, which has no keys.")
  return data


def from_dict(cls: type, data: Any, path: str = "") -> Any:
  """`data` (from YAML) as an instance of dataclass `cls`; see the module doc. Raises ConfigError."""
  return _convert(data, cls, path)


def to_dict(obj: Any) -> Any:
  """A dataclass tree as plain dicts, lists and scalars (YAML-safe)."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(k): to_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_dict(v) for v in obj]
  return obj


def _copy(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {k: _copy(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_copy(v) for v in x]
  return x


def _name(tp: Any) -> str:
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace("typing.", "")


def _fail(path: str, value: Any, expected: str) -> ConfigError:
  shown = repr(value)
  shown = shown if len(shown) <= 80 else shown[:77] + "..."
  return ConfigError(f"{path or 'the config'}: expected {expected}, got {shown} ({type(value).__name__}).")


def _convert(value: Any, tp: Any, path: str) -> Any:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if dataclasses.is_dataclass(tp):
    return _dataclass(value, tp, path)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # X | None: X's own error, which says more
      return _convert(value, options[0], path)
    for arg in options:
      try:
        return _convert(value, arg, path)
      except ConfigError:
        pass
    raise _fail(path, value, " or ".join(_name(a) for a in args))
  if origin is typing.Literal:
    if value not in args:
      raise _fail(path, value, f"one of {args}")
    return value
  if origin in (tuple, list) or tp in (tuple, list):
    pair = args[:1] and typing.get_origin(args[0]) is tuple and len(typing.get_args(args[0])) == 2
    if isinstance(value, Mapping) and pair:  # {key: value, ...} for a tuple of (key, value) pairs
      value = list(value.items())
    if not isinstance(value, (list, tuple)):
      raise _fail(path, value, f"a list ({_name(tp)})")
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise _fail(path, value, f"a list of {len(args)} items ({_name(tp)})")
      items = [_convert(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args))]
    else:
      item = args[0] if args else Any
      items = [_convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    return tuple(items) if (origin or tp) is tuple else items
  if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
    if not isinstance(value, Mapping):
      raise _fail(path, value, f"a mapping ({_name(tp)})")
    item = args[1] if len(args) == 2 else Any
    return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
  if tp is bool:
    if not isinstance(value, bool):
      raise _fail(path, value, "true or false")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _fail(path, value, "an integer")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _fail(path, value, "a number")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise _fail(path, value, "a string (quote it in YAML)")
    return value
  if tp is type(None):
    if value is not None:
      raise _fail(path, value, "null")
    return None
  raise ConfigError(f"{path}: the config type {_name(tp)} is not supported by typed_config.")


def _dataclass(value: Any, cls: type, path: str) -> Any:
  if isinstance(value, cls):
    return value
  if not isinstance(value, Mapping):
    raise _fail(path, value, f"a mapping of {cls.__name__}'s keys")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  for key in value:
    if key not in fields:
      near = difflib.get_close_matches(str(key), list(fields), n=1)
      hint = f" Did you mean {near[0]!r}?" if near else ""
      raise ConfigError(f"{_join(path, key)}: unknown key.{hint} The keys of {path or 'the config'} "
                        f"({cls.__name__}) are: {', '.join(fields)}.")
  missing = [n for n, f in fields.items() if n not in value and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{path or 'the config'} ({cls.__name__}) needs {', '.join(repr(m) for m in missing)}.")
  kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in value.items()}
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path or 'the config'}: {e}") from e


def _join(path: str, key: Any) -> str:
  return f"{path}.{key}" if path else str(key)
