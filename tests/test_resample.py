"""Position-embedding resampling computes what torch, HF and timm compute (float32, 1e-5).

The fixture (tests/fixtures/make_resample_fixture.py) holds torch's bicubic
resizes, with and without antialias, and HF's / timm's own resampling calls.
"""
import os

import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp

from big_vision_like.models import layers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "posemb_resample.npz")


def load():
  with np.load(FIXTURE) as f:
    return dict(f)


def split_grids(grids):
  return tuple(int(g) for g in grids[:2]), tuple(int(g) for g in grids[2:])


class TorchBicubicTest(parameterized.TestCase):

  @parameterized.parameters("bicubic", "bicubic_antialias")
  def test_matches_torch_up_and_down(self, method):
    arrays = load()
    cases = sorted({k.split("/")[0] for k in arrays if k.startswith("case")})
    self.assertGreaterEqual(len(cases), 6)
    for case in cases:
      old, new = split_grids(arrays[f"{case}/grids"])
      got = layers.resample_posemb(jnp.asarray(arrays[f"{case}/posemb"]), old, new, method)
      np.testing.assert_allclose(got, arrays[f"{case}/{method}"], atol=1e-5, rtol=0,
                                 err_msg=f"{case}: {old} -> {new}")

  @parameterized.parameters(("hf_vit", "bicubic"), ("hf_dinov2", "bicubic"),
                            ("hf_dinov2_registers", "bicubic_antialias"),
                            ("timm", "bicubic_antialias"))
  def test_matches_hf_and_timm(self, name, method):
    """The libraries' own calls on a [class, grid] table: the grid part resampled."""
    arrays = load()
    old, new = split_grids(arrays[f"{name}/grids"])
    table, want = arrays[f"{name}/table"], arrays[f"{name}/output"]
    got = layers.resample_posemb(jnp.asarray(table[:, 1:]), old, new, method)
    np.testing.assert_allclose(got, want[:, 1:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(want[:, :1], table[:, :1])

  def test_jit_and_dtype(self):
    x = jax.random.normal(jax.random.key(0), (1, 12, 8))
    resample = jax.jit(layers.resample_posemb, static_argnums=(1, 2, 3))
    np.testing.assert_allclose(resample(x, (3, 4), (5, 2), "bicubic"),
                               layers.resample_posemb(x, (3, 4), (5, 2), "bicubic"), atol=1e-6)
    half = layers.resample_posemb(x.astype(jnp.bfloat16), (3, 4), (6, 6), "bicubic_antialias")
    self.assertEqual((half.shape, half.dtype), ((1, 36, 8), jnp.bfloat16))

  @parameterized.parameters(False, True)
  def test_weights_sum_to_one(self, antialias):
    for old, new in [(1, 5), (4, 7), (7, 4), (16, 3), (5, 5)]:
      w = layers.torch_bicubic_weights(old, new, antialias)
      self.assertEqual(w.shape, (new, old))
      np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(layers.torch_bicubic_weights(5, 5, antialias), np.eye(5))

  def test_bilinear_default_is_jax_image_resize(self):
    x = jax.random.normal(jax.random.key(1), (1, 20, 3))
    want = jax.image.resize(x.reshape(1, 4, 5, 3), (1, 7, 3, 3), "bilinear").reshape(1, 21, 3)
    np.testing.assert_array_equal(layers.resample_posemb(x, (4, 5), (7, 3)), want)
    np.testing.assert_array_equal(layers.resample_posemb(x, (4, 5), (7, 3), "bilinear"), want)

  def test_unknown_method_names_the_valid_ones(self):
    with self.assertRaisesRegex(ValueError, "'cubic'; valid: bilinear, bicubic, "
                                            "bicubic_antialias"):
      layers.resample_posemb(jnp.ones((1, 4, 2)), (2, 2), (3, 3), "cubic")


if __name__ == "__main__":
  absltest.main()
