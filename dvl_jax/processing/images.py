"""Image loading and preprocessing, as DeepSeek-VL's processors do it (Pillow + numpy).

Pipeline (Ref: transformers image_utils.load_image + DeepseekVLImageProcessorPil / DeepseekVLHybridImageProcessorPil;
the original deepseek_vl/utils/io.py load_pil_images + models/image_processing_vlm.py VLMImageProcessor):
  load (+ EXIF orientation, as transformers) -> RGB (Pillow's conversion; alpha dropped, as both references do
  for files) -> resize the longest side to `size` (bicubic, uint8, PIL) -> pad to square with the mean colour
  -> rescale (1/255) -> normalise.
The hybrid (7B) processor makes the 1024 px image that way (CLIP mean and std), then the 384 px image by
resizing the padded 1024 px uint8 image (bilinear, PIL, which antialiases) and normalising it with 0.5/0.5.
Outputs are float32, channels-last [S, S, 3].
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.request
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS)
URL_TIMEOUT_S = 30

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING,
             "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


class ImageError(ValueError):
  """An image that cannot be read or used; the message names its source."""


def _describe(src: Any) -> str:
  if isinstance(src, (str, os.PathLike)):
    s = os.fspath(src)
    return repr(s if len(s) < 120 else s[:80] + "...")
  if isinstance(src, bytes):
    return f"<{len(src)} bytes>"
  if isinstance(src, np.ndarray):
    return f"<array {src.shape} {src.dtype}>"
  return f"<{type(src).__name__}>"


def _open_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
  if not data:
    raise ImageError(f"Cannot read image {name}: the file is empty (0 bytes).")
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ImageError(f"Refusing image {name}: {e}") from e
  except UnidentifiedImageError as e:  # its own message names an anonymous BytesIO, not the file
    raise ImageError(f"Cannot read image {name}: not an image file, or in a format Pillow cannot read "
                     f"(starts with {data[:8]!r}).") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(f"Cannot read image {name}: not a readable image file ({e}).") from e
  w, h = image.size
  if w * h > max_pixels:
    raise ImageError(f"Refusing image {name}: {w} x {h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                     "(a possible decompression bomb). Downscale it, or raise max_pixels if you trust it.")
  try:
    image.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(f"Cannot read image {name}: the file is truncated or corrupt ({e}).") from e
  return image


def load_image(src: ImageInput, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Opens an image from a path, an http(s) URL, a `data:` base64 URI, bytes, a PIL image or an array.

  Arrays are [H, W, C] (C in 1, 3, 4) or [H, W], uint8 or float in [0, 1]. Raises ImageError (or
  FileNotFoundError for a missing path) naming the source.
  """
  name = _describe(src)
  if isinstance(src, Image.Image):
    return src
  if isinstance(src, np.ndarray):
    arr = src
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
      raise ImageError(f"Cannot use image {name}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] channels-last.")
    if np.issubdtype(arr.dtype, np.floating):
      if arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
        raise ImageError(f"Cannot use image {name}: float arrays must hold values in [0, 1], got "
                         f"[{arr.min()}, {arr.max()}]; pass uint8 for 0-255 values.")
      arr = np.round(arr * 255)
    return Image.fromarray(arr.astype(np.uint8))
  if isinstance(src, bytes):
    return _open_bytes(src, name, max_pixels)
  if not isinstance(src, (str, os.PathLike)):
    raise ImageError(f"Cannot use image {name}: expected a path, URL, data URI, bytes, PIL image or array.")
  s = os.fspath(src)
  if s.startswith("data:"):
    header, _, payload = s.partition(",")
    if ";base64" not in header:
      raise ImageError(f"Cannot read image {name}: only base64 data URIs are supported ('data:image/png;base64,...').")
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ImageError(f"Cannot read image {name}: invalid base64 payload ({e}).") from e
    return _open_bytes(data, name, max_pixels)
  if s.startswith(("http://", "https://")):
    try:
      with urllib.request.urlopen(s, timeout=URL_TIMEOUT_S) as r:
        data = r.read()
    except OSError as e:
      raise ImageError(f"Cannot fetch image {name}: {e}.") from e
    return _open_bytes(data, name, max_pixels)
  if os.path.isdir(s):
    raise ImageError(f"Cannot read image {name}: it is a directory; give an image file.")
  if not os.path.isfile(s):
    raise FileNotFoundError(f"Image file {name} does not exist.")
  with open(s, "rb") as f:
    return _open_bytes(f.read(), name, max_pixels)


def to_rgb(image: Image.Image, alpha: str = "drop") -> Image.Image:
  """Converts any Pillow mode to RGB.

  alpha: "drop" ignores transparency: Pillow's `.convert("RGB")`, which transformers' load_image (the path every
    file, URL and chat-template image takes) and the original repo's load_pil_images both apply. "white"
    composites it onto white, as transformers' image processors do with do_convert_rgb=True.
  Other modes (L, P, CMYK, I;16, I, F, 1) go through Pillow's own conversion, as both references do.
  """
  if image.mode == "RGB":
    return image
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if has_alpha and alpha == "white":
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if alpha not in ("white", "drop"):
    raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}.")
  return image.convert("RGB")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageConfig:
  """How one image becomes model input. Defaults: the 1.3B `-hf` preprocessor config.

  rounding: "round" for the short side's length (transformers), "floor" (the original repo's `int()`).
  high_res_*: set for the hybrid (7B) processor; `size` and `resample` then describe the low-res image made
    from the padded high-res one.
  """

  size: int = 384
  min_size: int = 14
  resample: int = 3  # PIL BICUBIC
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  rounding: str = "round"
  alpha: str = "drop"
  exif_transpose: bool = True  # transformers' load_image applies EXIF orientation; the original does not
  high_res_size: int | None = None
  high_res_resample: int = 3
  high_res_image_mean: tuple[float, ...] = CLIP_MEAN
  high_res_image_std: tuple[float, ...] = CLIP_STD
  max_pixels: int = MAX_PIXELS

  def __post_init__(self):
    if self.rounding not in ("round", "floor"):
      raise ValueError(f"rounding must be 'round' (transformers) or 'floor' (original), got {self.rounding!r}.")
    for name in ("image_mean", "image_std", "high_res_image_mean", "high_res_image_std"):
      object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))

  @property
  def is_hybrid(self) -> bool:
    return self.high_res_size is not None

  @property
  def background(self) -> tuple[int, ...]:
    return tuple(int(m * 255) for m in self.image_mean)

  @property
  def high_res_background(self) -> tuple[int, ...]:
    return tuple(int(m * 255) for m in self.high_res_image_mean)


def resize_longest_side(image: Image.Image, size: int, min_size: int, resample: int, rounding: str) -> Image.Image:
  """Scales so the longest side is `size`, the other by the same factor (rounded or floored, at least
  min_size). Ref: DeepseekVLImageProcessorPil.resize; VLMImageProcessor.resize."""
  w, h = image.size
  scale = size / max(w, h)
  cut = round if rounding == "round" else int
  new_w, new_h = max(cut(w * scale), min_size), max(cut(h * scale), min_size)
  return image.resize((new_w, new_h), _RESAMPLE[resample])


def pad_to_square(image: Image.Image, background: Sequence[int]) -> Image.Image:
  """Centres the image on a square canvas of its longest side filled with `background`."""
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), tuple(background))
  canvas.paste(image, ((side - w) // 2, (side - h) // 2))
  return canvas


def _normalise(image: Image.Image, cfg_scale: float, mean, std, do_normalize: bool) -> np.ndarray:
  x = np.asarray(image, dtype=np.float64) * cfg_scale  # [S, S, 3]
  x = x.astype(np.float32)
  if do_normalize:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x


def preprocess(image: ImageInput, config: ImageConfig) -> dict[str, np.ndarray]:
  """One image -> {"pixel_values": [S, S, 3]} (+ "high_res_pixel_values": [S', S', 3] for the hybrid)."""
  pil = load_image(image, max_pixels=config.max_pixels)
  if config.exif_transpose:
    pil = ImageOps.exif_transpose(pil)
  pil = to_rgb(pil, config.alpha)
  if not config.is_hybrid:
    pil = resize_longest_side(pil, config.size, config.min_size, config.resample, config.rounding)
    pil = pad_to_square(pil, config.background)
    return {"pixel_values": _normalise(pil, config.rescale_factor, config.image_mean, config.image_std,
                                       config.do_normalize)}
  high = resize_longest_side(pil, config.high_res_size, config.min_size, config.high_res_resample, config.rounding)
  high = pad_to_square(high, config.high_res_background)
  # The low-res image comes from the padded high-res one. Ref: DeepseekVLHybridImageProcessorPil._preprocess.
  low = pad_to_square(resize_longest_side(high, config.size, config.min_size, config.resample, config.rounding),
                      config.background)
  return {
      "pixel_values": _normalise(low, config.rescale_factor, config.image_mean, config.image_std, config.do_normalize),
      "high_res_pixel_values": _normalise(high, config.rescale_factor, config.high_res_image_mean,
                                          config.high_res_image_std, config.do_normalize),
  }
