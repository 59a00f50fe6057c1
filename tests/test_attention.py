"""The ops attention entry point against a float64 numpy reference."""
import functools
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp

from big_vision_like import ops
from big_vision_like.ops import cpu_gemm
from big_vision_like.ops.attention import IMPLEMENTATIONS, choose
from big_vision_like.ops.chunked import chunked_attention
from big_vision_like.ops.pallas_attention import pallas_attention


def reference(q, k, v, bias=None, mask=None):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


class AttentionTest(parameterized.TestCase):

  @parameterized.product(
      shape=[(2, 7, 7, 3, 16, False, False),    # self-attention
             (2, 5, 11, 2, 32, False, False),   # cross-attention, unequal lengths
             (3, 9, 9, 4, 8, True, False),      # additive bias
             (2, 6, 10, 2, 16, False, True),    # key padding mask
             (1, 37, 53, 2, 64, True, True),    # odd lengths, several chunks
             (2, 40, 33, 2, 128, True, True)],  # head dim 128
      implementation=["xla", "openblas", "chunked"])  # pallas: test_pallas_kernels_forward_and_gradients
  def test_matches_float64_reference(self, shape, implementation):
    if implementation == "openblas" and not cpu_gemm.available():
      self.skipTest(f"no 'openblas' here: {cpu_gemm.unavailable_reason()}")
    b, lq, lk, h, d, with_bias, with_mask = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=s).astype(np.float32)
               for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
    bias = rng.normal(size=(1, h, lq, lk)).astype(np.float32) if with_bias else None
    mask = None
    if with_mask:
      lengths = rng.integers(1, lk + 1, size=b)
      mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    out = ops.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    bias=bias, mask=mask, implementation=implementation)
    self.assertEqual(out.shape, (b, lq, h, d))
    np.testing.assert_allclose(out, reference(q, k, v, bias, mask), atol=2e-5, rtol=2e-5)

  @parameterized.parameters(
      ((1, 2, 19, 23),),   # full bias
      ((1, 2, 1, 23),),    # broadcast over queries
      ((3, 1, 19, 23),),   # per example, shared over heads
  )
  def test_gradients_match_xla(self, bias_shape):
    """Gradients for q, k, v and the bias (Swin learns its bias) through both custom VJPs."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 19, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 23, 2, 16)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    mask = jnp.asarray(np.arange(23)[None, None, None, :] < np.array([23, 5, 17])[:, None, None, None])
    target = jnp.asarray(rng.normal(size=(3, 19, 2, 16)), jnp.float32)
    implementations = {
        "xla": lambda q, k, v, bias: ops.dot_product_attention(
            q, k, v, bias=bias, mask=mask, implementation="xla"),
        # small chunks / blocks: several blocks in both directions, with padding
        "chunked": lambda q, k, v, bias: chunked_attention(
            q, k, v, bias, mask, 16 ** -0.5, q_chunk=8, k_chunk=5),
        "pallas": lambda q, k, v, bias: pallas_attention(
            q, k, v, bias, mask, 16 ** -0.5, block_q=16, block_k=16),
    }
    grads = {name: jax.grad(lambda *a: ((f(*a) - target) ** 2).sum(), argnums=(0, 1, 2, 3))(
        q, k, v, bias) for name, f in implementations.items()}
    for name in ("chunked", "pallas"):
      for a, b in zip(grads["xla"], grads[name]):
        self.assertEqual(a.shape, b.shape)
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)

  @parameterized.named_parameters(
      # name, (batch, q_len, k_len, heads, head_dim), bias shape, key mask, dtype
      ("self_d32", (2, 37, 37, 2, 32), None, False, "float32"),
      ("cross_bias_mask_d64", (1, 20, 45, 2, 64), (1, 2, 20, 45), True, "float32"),
      ("windows_shared_bias_d32", (4, 16, 16, 2, 32), (1, 2, 16, 16), False, "float32"),
      ("mask_only_d128", (2, 33, 17, 1, 128), None, True, "float32"),
      ("odd_head_dim_24", (1, 18, 18, 2, 24), None, False, "float32"),
      ("bf16_bias_d64", (2, 40, 40, 2, 64), (1, 2, 40, 40), False, "bfloat16"),
  )
  def test_pallas_kernels_forward_and_gradients(self, dims, bias_shape, with_mask, dtype):
    """The Pallas forward and backward kernels against the XLA reference in float32
    (fp32 inputs: 2e-5; bf16 inputs: 2e-2 of each tensor's largest entry)."""
    b, lq, lk, h, d = dims
    rng = np.random.default_rng(3)
    q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, lk, h, d)).astype(np.float32) for _ in range(2))
    bias = None if bias_shape is None else rng.normal(size=bias_shape).astype(np.float32)
    mask = None
    if with_mask:
      mask = np.arange(lk)[None, :] < rng.integers(1, lk + 1, size=b)[:, None]
      mask = mask[:, None, None, :]
    target = rng.normal(size=(b, lq, h, d)).astype(np.float32)

    def loss(f, dtype):
      def g(q, k, v, bias):
        out = f(*(t.astype(dtype) for t in (q, k, v)), bias, mask, d ** -0.5)
        return ((out.astype(jnp.float32) - target) ** 2).sum(), out
      return jax.value_and_grad(g, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2),
                                has_aux=True)

    kernel = functools.partial(pallas_attention, block_q=16, block_k=16)
    (_, want_out), want = loss(IMPLEMENTATIONS["xla"], jnp.float32)(q, k, v, bias)
    (_, out), got = loss(kernel, jnp.dtype(dtype))(q, k, v, bias)
    self.assertEqual(out.dtype, jnp.dtype(dtype))
    tol = 2e-5 if dtype == "float32" else 2e-2
    for name, a, w in zip(("out", "dq", "dk", "dv", "dbias"), (out, *got), (want_out, *want)):
      scale = float(np.abs(np.asarray(w)).max())
      np.testing.assert_allclose(np.asarray(a, np.float32), w, atol=tol * scale, rtol=tol,
                                 err_msg=name)

  def test_pallas_backward_runs_the_kernels(self):
    x = jnp.ones((1, 20, 1, 32))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: pallas_attention(
        q, x, x, None, None, 0.1).sum()))(x))
    for name in ("bvl_flash_forward", "bvl_flash_backward_dkdv", "bvl_flash_backward_dq"):
      self.assertIn(name, jaxpr)

  @parameterized.named_parameters(
      ("vit_b16_bf16", (2, 197, 197, 12, 64), "bfloat16", None, False),
      ("pixels_d128_mask", (1, 4097, 4097, 2, 128), "bfloat16", None, True),
      ("swin_windows_fp32_d32", (8, 49, 49, 3, 32), "float32", (8, 3, 49, 49), False),
      ("perceiver_cross_d48", (2, 256, 4096, 1, 48), "float32", None, True),
  )
  def test_pallas_kernels_lower_to_triton_for_cuda(self, dims, dtype, bias_shape, with_mask):
    """Lowering for CUDA runs here (no GPU needed) and checks Triton's constraints
    (power-of-two blocks, dot shapes): forward, dK/dV and dQ kernels."""
    b, lq, lk, h, d = dims
    q = jax.ShapeDtypeStruct((b, lq, h, d), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((b, lk, h, d), jnp.dtype(dtype))
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.float32)
    mask = jax.ShapeDtypeStruct((b, 1, 1, lk), jnp.bool_) if with_mask else None
    loss = lambda q, k, v, bias, mask: pallas_attention(
        q, k, v, bias, mask, d ** -0.5, interpret=False).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, bias, mask).lower(
        lowering_platforms=("cuda",))
    self.assertEqual(lowered.as_text().count("__gpu$xla.gpu.triton"), 3)

  def test_chunked_memory_is_linear_in_sequence(self):
    """XLA's own memory analysis of the compiled forward+backward (compile only)."""
    def temp_bytes(impl, length):
      x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
      f = jax.jit(jax.grad(lambda q, k, v: ops.dot_product_attention(
          q, k, v, implementation=impl).sum(), argnums=(0, 1, 2)))
      return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    xla, chunked = temp_bytes("xla", 4096), temp_bytes("chunked", 4096)
    self.assertGreater(xla, 4096 * 4096 * 2 * 4)  # the [H, L, L] logits exist
    self.assertLess(chunked, xla / 8)

  @parameterized.parameters("xla", "chunked", "pallas")
  def test_bf16_inputs_keep_float32_softmax(self, implementation):
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 33, 2, 32)).astype(np.float32) for _ in range(3))
    out = ops.dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)),
                                    implementation=implementation)
    self.assertEqual(out.dtype, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v),
                               atol=3e-2, rtol=3e-2)

  def test_auto_equals_xla_for_short_sequences(self):
    x = jax.random.normal(jax.random.key(0), (2, 8, 2, 16))
    np.testing.assert_allclose(ops.dot_product_attention(x, x, x, implementation="auto"),
                               ops.dot_product_attention(x, x, x, implementation="xla"),
                               atol=1e-6, rtol=1e-6)

  def test_xla_lowers_to_no_custom_call(self):
    """The reference is plain XLA on every platform (here: CPU, where 'openblas'
    is a custom call), forward and backward, bias and mask included."""
    q = jnp.ones((2, 9, 2, 8))
    bias, mask = jnp.zeros((2, 9, 9)), jnp.ones((2, 1, 1, 9), bool)

    def lowered(implementation):
      attend = lambda q, k: ops.dot_product_attention(q, k, k, bias=bias, mask=mask,
                                                      implementation=implementation).sum()
      return jax.jit(jax.value_and_grad(attend, argnums=(0, 1))).lower(q, q).as_text()

    self.assertNotIn("custom_call", lowered("xla"))
    if cpu_gemm.available():
      self.assertEqual(lowered("openblas").count("custom_call @bvl_cpu_gemm"), 6)

  def test_unknown_or_unavailable_implementation(self):
    x = jnp.zeros((1, 4, 1, 8))
    with self.assertRaisesRegex(ValueError, "'flash3' is unknown; valid: auto, chunked, "
                                "cudnn, openblas, pallas, xla"):
      ops.dot_product_attention(x, x, x, implementation="flash3")
    if jax.default_backend() == "cpu":
      with self.assertRaisesRegex(ValueError, "'cudnn' is not available on cpu; available "
                                  "there: auto, xla, openblas, chunked, pallas"):
        ops.dot_product_attention(x, x, x, implementation="cudnn")
      # Whether this machine has the wheel installed must not matter.
      with mock.patch.object(cpu_gemm, "unavailable_reason", return_value=(
          "the scipy-openblas32 wheel is not installed (pip install 'big_vision_like[cpu]')")):
        with self.assertRaisesRegex(ValueError, r"^attention implementation 'openblas' is "
                                    r"unavailable here: the scipy-openblas32 wheel is not "
                                    r"installed \(pip install 'big_vision_like\[cpu\]'\); "
                                    r"'xla' is the same without OpenBLAS$"):
          ops.dot_product_attention(x, x, x, implementation="openblas")

  @parameterized.named_parameters(
      ("heads", (1, 4, 2, 8), (1, 5, 3, 8), None, None, r"head counts disagree: q\(1, 4, 2, 8\) k\(1, 5, 3, 8\)"),
      ("head_dims", (1, 4, 2, 8), (1, 5, 2, 4), None, None, "head dims disagree"),
      ("batch", (2, 4, 2, 8), (1, 5, 2, 8), None, None, "batch sizes disagree"),
      ("rank", (4, 2, 8), (1, 5, 2, 8), None, None, r"expects \[batch, length, heads, head_dim\]"),
      ("bias", (2, 4, 2, 8), (2, 5, 2, 8), (3, 4, 5), None,
       r"bias of shape \(3, 4, 5\) does not broadcast to the logits \[batch, heads, q_len, "
       r"k_len\] = \(2, 2, 4, 5\)"),
      ("mask", (2, 4, 2, 8), (2, 5, 2, 8), None, (2, 1, 1, 4), r"mask of shape \(2, 1, 1, 4\)"),
  )
  def test_bad_shapes_are_one_line_errors(self, q_shape, k_shape, bias_shape, mask_shape,
                                          message):
    bias = None if bias_shape is None else jnp.zeros(bias_shape)
    mask = None if mask_shape is None else jnp.ones(mask_shape, bool)
    with self.assertRaisesRegex(ValueError, message):
      ops.dot_product_attention(jnp.zeros(q_shape), jnp.zeros(k_shape), jnp.zeros(k_shape),
                                bias=bias, mask=mask)

  def test_auto_choice_per_platform_and_length(self):
    with mock.patch.object(cpu_gemm, "usable", return_value=True):
      self.assertEqual(choose("cpu", 197, 197), "openblas")
      self.assertEqual(choose("gpu", 197, 197), "xla")
      self.assertEqual(choose("tpu", 197, 197), "xla")
      self.assertEqual(choose("cpu", 1024, 1024), "chunked")
    with mock.patch.object(cpu_gemm, "usable", return_value=False):
      self.assertEqual(choose("cpu", 197, 197), "xla")
    self.assertEqual(choose("gpu", 197, 197), "xla")
    self.assertEqual(choose("cpu", 1024, 1024), "chunked")
    self.assertEqual(choose("gpu", 1024, 1024), "xla")
    self.assertEqual(choose("cpu", 4096, 4096), "chunked")
    self.assertEqual(choose("tpu", 50176, 50176), "chunked")
    self.assertEqual(choose("gpu", 4096, 4096), "pallas")
    self.assertEqual(choose("gpu", 256, 50176), "pallas")  # Perceiver cross-attention


class EveryModelEveryImplementationTest(parameterized.TestCase):
  """Models choose attention by name; every implementation gives the same output."""

  @parameterized.parameters("vit", "swin", "perceiver")
  def test_same_output(self, name):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from big_vision_like.models import MODELS  # pylint: disable=g-import-not-at-top
    kwargs = {
        "vit": dict(num_classes=3, patch_size=2, width=16, depth=2, num_heads=2,
                    image_size=8, pool="map", head_zero_init=False),
        "swin": dict(num_classes=3, patch_size=1, window_size=4, embed_dim=8, depths=(2, 1),
                     num_heads=(2, 2), image_size=8, drop_path=0.0, head_zero_init=False),
        "perceiver": dict(num_classes=3, image_size=8, num_latents=4, latent_dim=16,
                          num_blocks=1, self_attends_per_block=1, self_heads=2, num_bands=4),
    }[name]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    outputs = {}
    implementations = ("xla", "openblas", "chunked", "pallas") if cpu_gemm.available() else (
        "xla", "chunked", "pallas")
    for implementation in implementations:
      with nnx.use_eager_sharding(False):
        model = MODELS.build(name, dict(kwargs, attention=implementation), rngs=nnx.Rngs(0))
      outputs[implementation] = model(x)[0]
    for implementation in implementations[1:]:
      np.testing.assert_allclose(outputs["xla"], outputs[implementation], atol=1e-5,
                                 rtol=1e-5, err_msg=implementation)


if __name__ == "__main__":
  absltest.main()
