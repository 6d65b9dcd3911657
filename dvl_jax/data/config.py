"""What the data pipeline reads and how it makes batches: SourceConfig (one file) and DataConfig (the mixture and
the batches). Frozen dataclasses, checked when made: a wrong value names the field, what came and what is valid.

  sources = (SourceConfig("laion_captions.jsonl", "captions", images="/data/laion", weight=0.3),
             SourceConfig("sharegpt.jsonl", "conversations", weight=0.7))
  config = DataConfig(sources, batch_size=256, seq_len=4096, packing=True, text_warmup_steps=2000)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

FORMATS = ("captions", "conversations", "text")
MODALITIES = ("auto", "text", "multimodal")
OVERLONG = ("truncate", "drop")
CONTAINERS = (".jsonl", ".json", ".parquet")


def container(path: str) -> str:
  """The file kind by extension: ".jsonl" (one JSON object a line; also .ndjson), ".json" (one JSON list) or
  ".parquet"."""
  ext = os.path.splitext(path)[1].lower()
  ext = ".jsonl" if ext == ".ndjson" else ext
  if ext not in CONTAINERS:
    raise ValueError(f"Data file {path!r}: unknown extension {ext or '(none)'!r}; expected one of "
                     f"{CONTAINERS + ('.ndjson',)} (JSON lines, a JSON list, or Parquet).")
  return ext


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data file.

  Attributes:
    path: a .jsonl/.ndjson, .json (a list of records) or .parquet file.
    format: "captions" ({"image", "caption"}: a user turn with the image and `prompt`, the caption the answer),
      "conversations" (LLaVA's {"image", "conversations": [{"from", "value"}]} or transformers'
      {"messages": [{"role", "content"}]}, told apart per record) or "text" ({"text"}: every token learned).
    images: the directory that relative image paths start from; None: the data file's directory.
    weight: this source's share of the mixture (relative to the others; see DataConfig).
    prompt: captions only: the user's text after the image ("" : the image alone).
    columns: renames applied to every record before it is read, e.g. {"jpg": "image", "txt": "caption"}.
    modality: "text" or "multimodal", which stream of modality-grouped batches the source feeds; "auto": "text"
      for the text format, else "multimodal". A text source's records may hold no images.
    name: the source's name in reports; None: the file's name.
  """

  path: str
  format: str
  images: str | None = None
  weight: float = 1.0
  prompt: str = ""
  columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
  modality: str = "auto"
  name: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "path", os.fspath(self.path))
    object.__setattr__(self, "columns", dict(self.columns))
    container(self.path)
    if self.format not in FORMATS:
      raise ValueError(f"Source {self.path!r}: format={self.format!r} is not one of {FORMATS}.")
    if self.modality not in MODALITIES:
      raise ValueError(f"Source {self.path!r}: modality={self.modality!r} is not one of {MODALITIES}.")
    if not self.weight > 0:
      raise ValueError(f"Source {self.path!r}: weight must be > 0, got {self.weight!r} (leave a source out to "
                       "drop it).")
    if self.name is None:
      object.__setattr__(self, "name", os.path.basename(self.path))

  @property
  def is_text(self) -> bool:
    """Whether the source feeds the text stream."""
    return self.modality == "text" or (self.modality == "auto" and self.format == "text")

  @property
  def image_root(self) -> str:
    return self.images if self.images is not None else os.path.dirname(os.path.abspath(self.path))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The mixture and the batches.

  Attributes:
    sources: the SourceConfigs. Each sample is drawn from source i with probability weight_i / sum(weights)
      (within its modality's stream when `group_by_modality`).
    batch_size: rows per step over all processes (each process makes batch_size / process_count of them).
    seq_len: the most tokens of a row (image tokens included).
    packing: several samples per row of exactly seq_len tokens, each its own segment (S2's packed text);
      False: one sample per row, padded to the smallest of `buckets` that holds the batch's longest row.
    buckets: the row lengths of padding mode, ascending, the last one seq_len; (): multiples of 256 up to
      seq_len, and seq_len.
    max_images: image slots per row; a sample with more images is truncated before the first that does not fit.
    overlong: "truncate" a sample longer than seq_len (never inside an image, the truncated tail not learned)
      or "drop" it; both are counted.
    group_by_modality: every step all-text or all-multimodal (DeepSeek-VL's modality grouping); False: samples
      of every source mixed within each batch.
    text_warmup_steps: the modality warm-up: the text share of steps starts at 1.0 and falls linearly to its
      weight share over this many steps (0: at its weight share from the start). Needs group_by_modality.
    seed: shuffling, mixing and the modality of each step.
    shuffle: shuffle each source (each epoch anew); False: file order, for debugging.
    workers: worker processes that read, tokenise and preprocess (per stream); 0: in the training process.
    threads: reader threads in the training process or in each worker (Pillow decodes with the GIL released).
    pack_bins: packing: the rows filled at once (first fit); more pack tighter and hold more samples in memory.
    strict: stop at the first bad record (naming file:line) instead of skipping it.
    report_every: steps between summaries of skipped records in the log.
  """

  sources: tuple[SourceConfig, ...]
  batch_size: int
  seq_len: int = 4096
  packing: bool = False
  buckets: tuple[int, ...] = ()
  max_images: int = 1
  overlong: str = "truncate"
  group_by_modality: bool = True
  text_warmup_steps: int = 0
  seed: int = 0
  shuffle: bool = True
  workers: int = 0
  threads: int = 2
  pack_bins: int = 8
  strict: bool = False
  report_every: int = 100

  def __post_init__(self):
    sources = tuple(SourceConfig(**s) if isinstance(s, Mapping) else s for s in self.sources)
    object.__setattr__(self, "sources", sources)
    if not sources:
      raise ValueError("DataConfig needs at least one source.")
    for name in ("batch_size", "seq_len", "max_images", "threads", "pack_bins", "report_every"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"DataConfig.{name} must be a positive integer; got {getattr(self, name)!r}.")
    for name in ("workers", "text_warmup_steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"DataConfig.{name} must be an integer >= 0; got {getattr(self, name)!r}.")
    if self.overlong not in OVERLONG:
      raise ValueError(f"DataConfig.overlong={self.overlong!r} is not one of {OVERLONG}.")
    buckets = tuple(int(b) for b in self.buckets) or default_buckets(self.seq_len)
    if list(buckets) != sorted(set(buckets)) or buckets[-1] != self.seq_len or buckets[0] < 1:
      raise ValueError(f"DataConfig.buckets must ascend, without repeats, to seq_len={self.seq_len}; got "
                       f"{self.buckets!r}.")
    object.__setattr__(self, "buckets", buckets)
    if self.text_warmup_steps and not self.group_by_modality:
      raise ValueError("DataConfig.text_warmup_steps sets the text share of steps, which needs "
                       "group_by_modality=True (with it off, every batch mixes the modalities).")

  @property
  def text_share(self) -> float:
    """The text sources' share of the weights: the target fraction of all-text steps."""
    total = sum(s.weight for s in self.sources)
    return sum(s.weight for s in self.sources if s.is_text) / total


def default_buckets(seq_len: int) -> tuple[int, ...]:
  """Multiples of 256 below seq_len, then seq_len: few shapes to compile, at most 255 padding tokens a row."""
  return tuple(range(256, seq_len, 256)) + (seq_len,)
