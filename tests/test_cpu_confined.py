"""CPU speed-ups stay on CPU: a model's dense layers are plain dots wherever the
program is lowered for another platform or traced by a GPU / TPU process, and
nothing of ops.cpu_gemm is built there (docs/cpu_speed.md)."""
import re
from unittest import mock

import jax
import jax.numpy as jnp
from absl.testing import absltest
from flax import nnx

from big_vision_like import ops
from big_vision_like.models import MODELS, layers
from big_vision_like.ops import cpu_gemm

_VIT = dict(num_classes=3, patch_size=2, width=16, depth=2, num_heads=2, image_size=8,
            head_zero_init=False)


def _tiny_vit(plain: bool = False):
  """A tiny ViT; `plain`: its dense layers built with nnx.Linear's own lax.dot_general."""
  dot = jax.lax.dot_general if plain else layers.linear_dot
  with nnx.use_eager_sharding(False), mock.patch.object(layers, "linear_dot", dot):
    return MODELS.build("vit", _VIT, rngs=nnx.Rngs(0))


def _gradient(model):
  """A fresh function each call (jax caches traces per function, and these tests
  trace the same model as different processes would)."""
  graphdef, params = nnx.split(model)
  loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params)(x)[0] ** 2)
  return jax.grad(loss), params, jnp.zeros((2, 8, 8, 3))


def _lowered(model, platform: str) -> str:
  grad, params, x = _gradient(model)
  return jax.jit(grad).trace(params, x).lower(lowering_platforms=(platform,)).as_text()


def _dots(text: str) -> list[str]:
  """The program's dot_general ops (operands, dims, shapes), SSA names dropped."""
  return sorted(re.sub(r"%[\w#]+", "%", line.split("=", 1)[1]).strip()
                for line in text.splitlines() if "stablehlo.dot_general" in line)


class DenseLayersTest(absltest.TestCase):

  def test_lowered_for_cuda_they_are_nnx_linear_dots(self):
    """Lowered for CUDA from this CPU process, forward + backward: the same dots
    as nnx.Linear's own, and no custom call (the attention's OpenBLAS products
    included); lowered for CPU, the custom weight gradient is there."""
    ours, plain = _tiny_vit(), _tiny_vit(plain=True)
    cuda = _lowered(ours, "cuda")
    self.assertEqual(_dots(cuda), _dots(_lowered(plain, "cuda")))
    self.assertFalse("custom_call" in cuda, "a custom call in the CUDA lowering")
    cpu = _lowered(ours, "cpu")
    self.assertNotEqual(_dots(cpu), _dots(_lowered(plain, "cpu")))
    # layers._matmul's weight gradient contracts [batch x tokens, width] matrices:
    # 2 x 17 tokens (16 patches and the class token).
    tokens = "tensor<34x16xf32>"
    self.assertTrue(tokens in cpu, "CPU lowering without layers._matmul's backward")
    self.assertFalse(tokens in cuda, "CUDA lowering with layers._matmul's backward")
    self.assertEqual("bvl_cpu_gemm" in cpu, cpu_gemm.available())

  def test_a_gpu_or_tpu_process_traces_plain_dots(self):
    """No custom VJP, no platform switch in the traced program, so forward-mode
    autodiff works; the CPU process's trace has layers._matmul's weight gradient
    over [batch x tokens] matrices (what the test would miss if the switch did
    nothing)."""
    model = _tiny_vit()
    marks = ("custom_vjp", "platform_index", "f32[34,16]")
    for backend in ("gpu", "tpu"):
      with self.subTest(backend), mock.patch.object(jax, "default_backend",
                                                    return_value=backend):
        grad, params, x = _gradient(model)
        program = str(jax.make_jaxpr(grad)(params, x))
        self.assertEqual([m for m in marks if m in program], [])
        graphdef, params = nnx.split(model)
        jax.jvp(lambda x: nnx.merge(graphdef, params)(x)[0], (x,), (x,))
    grad, params, x = _gradient(model)
    program = str(jax.make_jaxpr(grad)(params, x))
    self.assertEqual([m for m in marks[1:] if m in program], list(marks[1:]))


class NoBuildOffCpuTest(absltest.TestCase):

  def test_a_gpu_process_never_builds_or_calls_cpu_gemm(self):
    cpu_gemm.unavailable_reason.cache_clear()
    x = jnp.ones((1, 8, 2, 16))
    try:
      with mock.patch.object(jax, "default_backend", return_value="gpu"), \
          mock.patch.object(cpu_gemm, "_register", side_effect=AssertionError("built")):
        self.assertEqual(ops.attention.choose("gpu", 8, 8), "xla")
        program = jax.jit(lambda x: ops.dot_product_attention(x, x, x)).lower(x).as_text()
        program += jax.jit(lambda x: cpu_gemm.einsum("bqhd,bkhd->bhqk", x, x)).lower(x).as_text()
        self.assertNotIn("custom_call", program)
        with self.assertRaisesRegex(ValueError, "'openblas' is not available on gpu"):
          ops.dot_product_attention(x, x, x, implementation="openblas")
        self.assertFalse(cpu_gemm.usable())
    finally:
      cpu_gemm.unavailable_reason.cache_clear()


if __name__ == "__main__":
  absltest.main()
