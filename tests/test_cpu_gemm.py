"""ops.cpu_gemm: OpenBLAS products in place of XLA's dots on CPU, values and
gradients against jnp.einsum at float64, and the fall-backs. Needs the `cpu`
extra (scipy-openblas32) and a C++ compiler; without them the tests of the
products skip, saying which is missing."""
import os
import pathlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from big_vision_like.ops import cpu_gemm


def _import_or_skip(name):
  """The module, or the test skips saying it is not installed (the `cpu` extra)."""
  try:
    return __import__(name)
  except ImportError:
    raise absltest.SkipTest(f"{name} is not installed (pip install 'big_vision_like[cpu]')")

# spec, x shape, y shape: the products the models run (dense layers, attention
# over [B, L, H, D] heads and their gradients) and edge cases of the strides.
CASES = [
    ("dense", "mk,kn->mn", (37, 24), (24, 40)),
    ("dense_3d", "abk,kn->abn", (3, 13, 24), (24, 8)),
    ("weight_grad", "abk,abn->kn", (3, 13, 24), (3, 13, 8)),
    ("logits", "bqhd,bkhd->bhqk", (2, 11, 3, 16), (2, 7, 3, 16)),
    ("weighted_values", "bhqk,bkhd->bqhd", (2, 3, 11, 7), (2, 7, 3, 16)),
    ("key_grad", "bhqk,bqhd->bkhd", (2, 3, 11, 7), (2, 11, 3, 16)),
    ("transposed_out", "mk,kn->nm", (9, 5), (5, 6)),
    ("one_batch_dim", "bmk,bkn->bmn", (4, 6, 5), (4, 5, 3)),
    ("vector", "mk,k->m", (6, 5), (5,)),
    ("size_one", "bqhd,bkhd->bhqk", (1, 1, 2, 4), (1, 3, 2, 4)),
]


def _inputs(x_shape, y_shape):
  rng = np.random.default_rng(0)
  return (rng.standard_normal(x_shape).astype(np.float32),
          rng.standard_normal(y_shape).astype(np.float32))


def _custom_calls(fn, *args, platform="cpu") -> int:
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
  return lowered.as_text().count(cpu_gemm._TARGET)


def _skip_unless_available(test):
  if not cpu_gemm.available():
    test.skipTest(f"ops.cpu_gemm cannot run here: {cpu_gemm.unavailable_reason()}")


class CpuGemmTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    _skip_unless_available(self)

  @parameterized.named_parameters(*CASES)
  def test_values_and_gradients_match_float64(self, spec, x_shape, y_shape):
    x, y = _inputs(x_shape, y_shape)
    out = jax.jit(lambda a, b: cpu_gemm.einsum(spec, a, b))(x, y)
    np.testing.assert_allclose(out, np.einsum(spec, x.astype(np.float64), y), rtol=1e-5,
                               atol=1e-5)
    cotangent = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    loss = lambda f: lambda a, b: jnp.sum(f(spec, a, b) * cotangent)
    got = jax.jit(jax.grad(loss(cpu_gemm.einsum), argnums=(0, 1)))(x, y)
    with jax.enable_x64():
      want = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x.astype(np.float64),
                                                        y.astype(np.float64))
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Forward and both gradients went through OpenBLAS (vectors included).
    self.assertEqual(
        _custom_calls(jax.value_and_grad(loss(cpu_gemm.einsum), argnums=(0, 1)), x, y), 3)

  def test_falls_back_to_xla_where_it_does_not_apply(self):
    x, y = _inputs((4, 6), (6, 5))
    cases = {
        "bfloat16": (lambda a, b: cpu_gemm.einsum("mk,kn->mn", a.astype(jnp.bfloat16),
                                                  b.astype(jnp.bfloat16)), x, y),
        # m's two indices are not adjacent in the output: no strided view.
        "non_adjacent": (lambda a, b: cpu_gemm.einsum("ijk,kn->inj", a, b),
                         x.reshape(2, 2, 6), y),
    }
    for name, (fn, a, b) in cases.items():
      with self.subTest(name):
        self.assertEqual(_custom_calls(fn, a, b), 0)
        spec = "mk,kn->mn" if name == "bfloat16" else "ijk,kn->inj"
        np.testing.assert_allclose(fn(a, b), np.einsum(spec, a, b), rtol=2e-2, atol=5e-2)
    with cpu_gemm.disabled():
      self.assertEqual(_custom_calls(lambda a, b: cpu_gemm.einsum("mk,kn->mn", a, b), x, y), 0)
    self.assertEqual(_custom_calls(lambda a, b: cpu_gemm.einsum("mk,kn->mn", a, b), x, y), 1)

  def test_lowered_for_another_platform_it_is_jnp_einsum(self):
    x, y = _inputs((4, 6), (6, 5))
    grad = jax.grad(lambda a, b: cpu_gemm.einsum("mk,kn->mn", a, b).sum(), argnums=(0, 1))
    self.assertEqual(_custom_calls(grad, x, y), 2)
    for platform in ("cuda", "tpu"):
      self.assertEqual(_custom_calls(grad, x, y, platform=platform), 0, platform)

  def test_vmap(self):
    x, y = _inputs((3, 4, 6), (6, 5))
    out = jax.vmap(lambda a: cpu_gemm.einsum("mk,kn->mn", a, y))(x)
    np.testing.assert_allclose(out, x @ y, rtol=1e-5, atol=1e-5)

  def test_rejects_einsums_it_cannot_express(self):
    x, y = _inputs((4, 6), (6, 5))
    with self.assertRaisesRegex(ValueError, "summed within one operand"):
      cpu_gemm.einsum("mk,jn->mn", x, y)
    with self.assertRaisesRegex(ValueError, "repeated or unknown"):
      cpu_gemm.einsum("mk,kn->mz", x, y)
    with self.assertRaisesRegex(ValueError, r"shapes \(4, 6\) and \(5, 6\) do not fit"):
      cpu_gemm.einsum("mk,kn->mn", x, y.T)

  def test_kernel_checks_its_geometry(self):
    """A geometry that reads past a buffer is an error, not a crash or garbage."""
    x, y = _inputs((4, 6), (6, 5))
    geometry, out_shape, _ = cpu_gemm._geometry("mk,kn->mn", x.shape, y.shape)
    bad = list(geometry)
    bad[2] = 40  # m: 40 rows of a 4-row matrix
    call = jax.ffi.ffi_call(cpu_gemm._TARGET, jax.ShapeDtypeStruct((40, 5), jnp.float32))
    with self.assertRaisesRegex(Exception, "outside a buffer"):
      jax.block_until_ready(call(x, y, geometry=np.asarray(bad, np.int64)))


class AttentionUsesItTest(absltest.TestCase):
  """The models' attention ('openblas', which 'auto' picks on CPU for short
  sequences) runs its two products through OpenBLAS in float32 on one CPU device,
  bias and mask included, and through XLA in bfloat16."""

  def test_attention_products_go_through_openblas(self):
    _skip_unless_available(self)
    from big_vision_like import ops
    q, k = _inputs((2, 9, 2, 8), (2, 9, 2, 8))
    bias = np.zeros((2, 9, 9), np.float32)
    mask = np.ones((2, 1, 1, 9), bool)
    attend = lambda q, k: ops.dot_product_attention(q, k, k, bias=bias, mask=mask,
                                                    implementation="auto")
    train = jax.value_and_grad(lambda q, k: jnp.sum(attend(q, k)), argnums=(0, 1))
    self.assertEqual(_custom_calls(train, q, k), 6)  # 2 products forward, 4 backward
    self.assertEqual(_custom_calls(attend, q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)), 0)


class BuildTest(absltest.TestCase):

  def test_a_failed_build_says_why_and_einsum_still_works(self):
    scipy_openblas32 = _import_or_skip("scipy_openblas32")
    with mock.patch.dict(os.environ, {"CXX": "false", "BVL_CACHE_DIR": self.create_tempdir().full_path}):
      with self.assertRaisesRegex(cpu_gemm.Unavailable, "compiling cpu_gemm.cc failed"):
        cpu_gemm._compile(scipy_openblas32)
    with mock.patch.object(cpu_gemm, "available", return_value=False):
      x, y = _inputs((4, 6), (6, 5))
      self.assertEqual(_custom_calls(lambda a, b: cpu_gemm.einsum("mk,kn->mn", a, b), x, y), 0)

  def tearDown(self):
    cpu_gemm.unavailable_reason.cache_clear()
    cpu_gemm._register.cache_clear()
    super().tearDown()

  def test_an_unusable_cache_directory_is_a_warning_not_a_crash(self):
    scipy_openblas32 = _import_or_skip("scipy_openblas32")
    del scipy_openblas32
    blocker = self.create_tempfile()  # a file where the cache directory should be
    cpu_gemm.unavailable_reason.cache_clear()
    cpu_gemm._register.cache_clear()
    with mock.patch.dict(os.environ, {"BVL_CACHE_DIR": os.path.join(blocker.full_path, "x")}), \
        self.assertLogs(level="WARNING") as logs:
      self.assertFalse(cpu_gemm.available())
    self.assertIn("OpenBLAS CPU matmuls unavailable", logs.output[0])

  def test_without_the_wheel_it_is_one_line_naming_the_extra(self):
    cpu_gemm.unavailable_reason.cache_clear()
    cpu_gemm._register.cache_clear()
    with mock.patch.dict(sys.modules, {"scipy_openblas32": None}), \
        self.assertLogs(level="WARNING") as logs:
      self.assertFalse(cpu_gemm.available())
    self.assertEqual(cpu_gemm.unavailable_reason(), "the scipy-openblas32 wheel is not "
                     "installed (pip install 'big_vision_like[cpu]')")
    self.assertLen(logs.output, 1)
    self.assertNotIn("\n", logs.output[0])
    x, y = _inputs((4, 6), (6, 5))
    np.testing.assert_allclose(cpu_gemm.einsum("mk,kn->mn", x, y), x @ y, rtol=1e-5)

  def test_switched_off_by_environment(self):
    cpu_gemm.unavailable_reason.cache_clear()
    with mock.patch.dict(os.environ, {"BVL_CPU_GEMM": "0"}):
      self.assertFalse(cpu_gemm.available())
      self.assertIn("BVL_CPU_GEMM=0", cpu_gemm.unavailable_reason())

  def test_build_is_cached_per_source(self):
    _skip_unless_available(self)
    import scipy_openblas32
    library = cpu_gemm._compile(scipy_openblas32)
    self.assertTrue(library.exists())
    self.assertEqual(cpu_gemm._compile(scipy_openblas32), library)  # no rebuild
    self.assertEqual(library.parent, pathlib.Path(cpu_gemm._cache_dir()))


if __name__ == "__main__":
  absltest.main()
