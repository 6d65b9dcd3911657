"""Image-token splicing: each row takes its own images, in order; unused slots are ignored."""

import jax.numpy as jnp
import numpy as np

from dvl_jax.nn.vlm import splice_image_features


def test_splice_takes_each_rows_features_in_order():
  embeds = jnp.zeros((2, 6, 1))
  is_image = jnp.array([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
  # Row 0: two images of 2 tokens; row 1: one image, its second slot is unused (filled with junk).
  features = jnp.array([[1, 2, 3, 4], [5, 6, 99, 99]], jnp.float32)[..., None]
  out = np.asarray(splice_image_features(embeds, is_image, features))[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 4], [5, 6, 0, 0, 0, 0]])
