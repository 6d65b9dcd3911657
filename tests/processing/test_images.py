"""Pixel values against transformers' PIL-backend image processors on real images; inputs, modes and errors."""

import base64
import glob
import http.server
import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from dvl_jax.processing.images import ImageConfig, ImageError, load_image, preprocess, to_rgb
from reference import DATA, hf_image_processor

IMAGES = sorted(glob.glob(os.path.join(DATA, "*.png")) + glob.glob(os.path.join(DATA, "*.jp*g")))
PLAIN = ImageConfig()  # the 1.3B -hf preprocessor config
HYBRID = ImageConfig(resample=2, high_res_size=1024)  # the 7B -hf one


def _hf(processor, image, key="pixel_values"):
  """transformers' path for an image source: image_utils.load_image (EXIF, RGB), then the image processor."""
  from transformers.image_utils import load_image as hf_load_image

  return processor(hf_load_image(image), return_tensors="np")[key][0].transpose(1, 2, 0)  # CHW -> HWC


@pytest.mark.parametrize("path", IMAGES, ids=os.path.basename)
def test_pixel_values_match_transformers_pil_backend(path):
  ours = preprocess(path, PLAIN)["pixel_values"]
  expected = _hf(hf_image_processor(), path)
  assert ours.shape == expected.shape == (384, 384, 3)
  assert np.abs(ours - expected).max() < 1e-3


@pytest.mark.parametrize("name", ["dog_a.png", "training_pipelines_small.jpg", "app.png"])
def test_hybrid_pixel_values_match_transformers_pil_backend(name):
  path = os.path.join(DATA, name)
  ours = preprocess(path, HYBRID)
  ref = hf_image_processor(hybrid=True)
  for key, size in (("pixel_values", 384), ("high_res_pixel_values", 1024)):
    expected = _hf(ref, path, key)
    assert ours[key].shape == expected.shape == (size, size, 3)
    assert np.abs(ours[key] - expected).max() < 1e-3, key


def test_round_and_floor_differ_as_the_two_references_do():
  """dog_a.png (766 x 714) is 357.9 rows at 384: transformers rounds to 358, the original floors to 357."""
  path = os.path.join(DATA, "dog_a.png")
  for rounding, rows in (("round", 358), ("floor", 357)):
    x = preprocess(path, ImageConfig(rounding=rounding))["pixel_values"]
    background = np.all(np.isclose(x, (127 / 255 - 0.5) / 0.5, atol=1e-6), axis=(1, 2))
    assert (~background).sum() == rows, rounding


MODES = ["L", "LA", "P", "PA", "RGBA", "CMYK", "1", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_convert_as_transformers_does(mode):
  rng = np.random.default_rng(0)
  rgba = Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA")
  image = rgba.convert(mode) if mode != "PA" else rgba.convert("RGB").convert("P")
  if mode == "PA":  # a palette with a transparent index
    image.info["transparency"] = 0
  expected = _hf(hf_image_processor(), image)
  assert np.abs(preprocess(image, PLAIN)["pixel_values"] - expected).max() < 1e-3


def test_sixteen_bit_images_follow_pillow_conversion():
  """Both references hand a 16-bit image to Pillow's RGB conversion (which saturates at 255); so do we."""
  image = Image.fromarray(np.arange(0, 65536, 8, dtype=np.uint16).reshape(64, 128))
  assert image.mode.startswith("I;16")
  np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
  assert np.abs(preprocess(image, PLAIN)["pixel_values"] - _hf(hf_image_processor(), image)).max() < 1e-3


def test_exif_orientation_is_applied_like_transformers(tmp_path):
  image = Image.open(os.path.join(DATA, "monday.jpg"))
  exif = image.getexif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  path = tmp_path / "rotated.jpg"
  image.save(path, exif=exif)
  ours = preprocess(str(path), PLAIN)["pixel_values"]
  assert np.abs(ours - _hf(hf_image_processor(), str(path))).max() < 1e-3
  assert np.abs(ours - preprocess(str(path), ImageConfig(exif_transpose=False))["pixel_values"]).max() > 0.5


def test_alpha_white_matches_the_image_processor_given_a_transparent_image():
  """Given an RGBA PIL image directly, transformers' image processor (do_convert_rgb=True) composites it onto
  white; alpha="white" does the same. The default drops alpha, as file loading does in both references."""
  image = Image.open(os.path.join(DATA, "logo.png"))
  assert (np.asarray(image)[..., 3] < 255).mean() > 0.5  # mostly transparent
  direct = hf_image_processor(do_convert_rgb=True)(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert np.abs(preprocess(image, ImageConfig(alpha="white"))["pixel_values"] - direct).max() < 1e-3
  dropped = preprocess(image, PLAIN)["pixel_values"]
  np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
  assert np.abs(dropped - direct).max() > 0.5


def _serve(directory):
  handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=directory, **k)  # noqa: E731
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def test_every_input_kind_gives_the_same_pixels():
  path = os.path.join(DATA, "monday.jpg")
  expected = preprocess(path, PLAIN)["pixel_values"]
  data = open(path, "rb").read()
  array = np.asarray(Image.open(path).convert("RGB"))
  server = _serve(DATA)
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/monday.jpg"
    sources = [data, Image.open(path), array, array / 255.0, f"data:image/jpeg;base64,{base64.b64encode(data).decode()}",
               url]
    for src in sources:
      np.testing.assert_allclose(preprocess(src, PLAIN)["pixel_values"], expected, atol=1e-5)
  finally:
    server.shutdown()


# ----- bad input -----

def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.png"):
    load_image(str(tmp_path / "nope.png"))


def test_corrupt_and_non_image_files_are_named(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not an image")
  with pytest.raises(ImageError, match=r"notes\.txt.*not an image file") as err:
    load_image(str(text))
  assert "BytesIO" not in str(err.value)
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(ImageError, match=r"empty\.png.*the file is empty \(0 bytes\)"):
    load_image(str(empty))
  truncated = tmp_path / "cut.jpg"
  truncated.write_bytes(open(os.path.join(DATA, "monday.jpg"), "rb").read()[:5000])
  with pytest.raises(ImageError, match=r"cut\.jpg.*truncated or corrupt"):
    load_image(str(truncated))


def _png_claiming(width, height) -> bytes:
  """A tiny PNG whose header claims width x height pixels."""
  buf = io.BytesIO()
  Image.new("L", (1, 1)).save(buf, "PNG")
  data = bytearray(buf.getvalue())
  ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
  data[16:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
  return bytes(data)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_claiming(100_000, 100_000))
  with pytest.raises(ImageError, match=r"bomb\.png.*(decompression bomb|exceeds)"):
    load_image(str(bomb))
  with pytest.raises(ImageError, match=r"878 x 620 = 544,360 pixels exceeds the limit of 1,000"):
    load_image(os.path.join(DATA, "monday.jpg"), max_pixels=1000)


def test_bad_arrays_and_data_uris():
  with pytest.raises(ImageError, match=r"float arrays must hold values in \[0, 1\]"):
    load_image(np.full((4, 4, 3), 200.0))
  with pytest.raises(ImageError, match="channels-last"):
    load_image(np.zeros((3, 8, 8, 2), np.uint8))
  with pytest.raises(ImageError, match="invalid base64"):
    load_image("data:image/png;base64,@@@")
