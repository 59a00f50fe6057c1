"""ViT shapes for every variant, patch sizes down to 1, scan/remat equivalence."""
import math

import numpy as np
from absl.testing import absltest, parameterized

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import MODELS, layers, vit
from big_vision_like.registry import ConfigError


def tiny(**kw):
  args = dict(num_classes=5, patch_size=2, width=16, depth=2, num_heads=2,
              image_size=8, channels=3)
  args.update(kw)
  with nnx.use_eager_sharding(False):
    return vit.ViT(**args, rngs=nnx.Rngs(0))


class ViTTest(parameterized.TestCase):

  @parameterized.parameters(
      ("Ti/16", 224, 192), ("S/16", 224, 384), ("B/16", 224, 768),
      ("L/16", 224, 1024), ("H/14", 224, 1280), ("B/1", 32, 768))
  def test_variant_shapes(self, variant, size, width):
    """Abstract evaluation: the real parameter and output shapes, no FLOPs spent."""
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: vit.ViT(num_classes=10, variant=variant,
                                             image_size=size, rngs=nnx.Rngs(0)))
    patch = int(variant.split("/")[1])
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    logits, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    tokens = (size // patch) ** 2
    self.assertEqual(logits.shape, (2, 10))
    self.assertEqual(aux["tokens"].shape, (2, tokens, width))
    self.assertEqual(aux["pre_logits"].shape, (2, width))
    self.assertEqual(model.pos_embedding.shape, (1, tokens, width))

  @parameterized.parameters(1, 2, 4, 8)
  def test_patch_sizes_down_to_pixels(self, patch):
    model = tiny(patch_size=patch)
    logits, aux = model(jnp.ones((3, 8, 8, 3)))
    self.assertEqual(logits.shape, (3, 5))
    self.assertEqual(aux["grid"], (8 // patch, 8 // patch))
    self.assertEqual(aux["tokens"].shape, (3, (8 // patch) ** 2, 16))

  @parameterized.parameters("cls", "gap", "map")
  def test_pooling(self, pool):
    logits, aux = tiny(pool=pool, head_zero_init=False)(jnp.ones((2, 8, 8, 3)))
    self.assertEqual(logits.shape, (2, 5))
    self.assertEqual(aux["tokens"].shape[1], 16)  # class token removed
    self.assertGreater(float(jnp.abs(logits).sum()), 0.0)

  def test_patchify_is_a_strided_conv(self):
    """Reshape + matmul equals a stride-p convolution with the same kernel."""
    model = tiny(patch_size=4, head_zero_init=False)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    ours = model.embedding(model.patchify(x))
    kernel = model.embedding.kernel[...].reshape(4, 4, 3, 16)
    conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv.reshape(2, 4, 16) + model.embedding.bias[...]
    np.testing.assert_allclose(ours, conv, atol=1e-5)

  def test_other_input_size_resamples_position_embedding(self):
    model = tiny(patch_size=2, image_size=8)
    logits, aux = model(jnp.ones((1, 12, 12, 3)))
    self.assertEqual(aux["grid"], (6, 6))
    self.assertEqual(logits.shape, (1, 5))
    pe = jnp.arange(16.0).reshape(1, 16, 1) * jnp.ones((1, 1, 4))
    same = layers.resample_posemb(pe, (4, 4), (4, 4))
    np.testing.assert_array_equal(same, pe)
    bigger = layers.resample_posemb(pe, (4, 4), (8, 8))
    self.assertEqual(bigger.shape, (1, 64, 4))
    self.assertAlmostEqual(float(bigger.mean()), float(pe.mean()), places=4)

  def test_sincos_posemb_has_no_parameter(self):
    model = tiny(posemb="sincos2d")
    self.assertFalse(hasattr(model, "pos_embedding"))
    self.assertEqual(model(jnp.ones((1, 8, 8, 3)))[0].shape, (1, 5))

  def test_scan_equals_loop(self):
    """Stacking the loop model's block params into the scanned model gives the same output."""
    loop, scanned = tiny(head_zero_init=False), tiny(scan=True, head_zero_init=False)
    loop_state = nnx.to_pure_dict(nnx.split(loop)[1])
    scan_graph, scan_state = nnx.split(scanned)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[loop_state["blocks"][i] for i in range(2)])
    new = dict(loop_state, blocks=stacked)
    nnx.replace_by_pure_dict(scan_state, new)
    scanned = nnx.merge(scan_graph, scan_state)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    np.testing.assert_allclose(loop(x)[0], scanned(x)[0], atol=1e-5)

  @parameterized.parameters(False, True)
  def test_remat_same_values_and_grads(self, scan):
    plain, remat = tiny(scan=scan, head_zero_init=False), tiny(scan=scan, remat=True,
                                                               head_zero_init=False)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))

    def grads(model):
      graphdef, params = nnx.split(model)
      loss = lambda p: nnx.merge(graphdef, p)(x)[0].sum()
      return jax.grad(loss)(params)

    np.testing.assert_allclose(plain(x)[0], remat(x)[0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
      # Gradients reach ~400 here: float32 summation order alone (XLA's or OpenBLAS's
      # blocking) moves an entry by ~1e-6 of the tensor's largest.
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a).max()))

  def test_pixel_tokens_train_in_little_memory(self):
    """Patch 1 on 32x32 (1,024 tokens): chunked attention + scan + remat hold a small
    part of the plain model's training temporaries (XLA's memory analysis, compile
    only); remat without scan saves nothing on CPU, hence the config's `scan`."""
    def temp_bytes(**kw):
      model = tiny(patch_size=1, image_size=32, width=32, depth=4, **kw)
      graphdef, params = nnx.split(model)
      loss = lambda p, x: nnx.merge(graphdef, p)(x, train=True)[0].sum()
      x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
      compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(attention="xla")
    lean = temp_bytes(attention="chunked", remat=True, scan=True)
    self.assertGreater(plain, 8 * 4 * 1024 * 1024 * 2 * 4)  # the logits of 4 layers exist
    self.assertLess(lean, plain / 8)  # measured: 80 MB vs 1,008 MB

  def test_stochastic_depth_only_in_training(self):
    model = tiny(drop_path=0.5, head_zero_init=False, depth=4)
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 3))
    eval_a, eval_b = model(x)[0], model(x, train=False, rng=jax.random.key(5))[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model(x, train=True, rng=jax.random.key(5))[0]
    train_b = model(x, train=True, rng=jax.random.key(6))[0]
    self.assertFalse(np.allclose(train_a, train_b))

  def test_layerscale_and_bf16_compute(self):
    model = tiny(layerscale=1e-4, dtype="bfloat16")
    self.assertEqual(model.blocks[0].ls1.gamma[...].dtype, jnp.float32)
    self.assertEqual(model.embedding.kernel[...].dtype, jnp.float32)
    logits, aux = model(jnp.ones((1, 8, 8, 3)))
    self.assertEqual(aux["tokens"].dtype, jnp.bfloat16)
    self.assertEqual(logits.dtype, jnp.float32)

  @parameterized.parameters(dict(pool="map"),
                            dict(mlp="swiglu", qkv_bias=False, num_registers=2, scan=True))
  def test_every_parameter_has_logical_axes(self, **kw):
    graphdef, state = nnx.split(tiny(**kw))
    for path, var in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
      names = var.get_metadata().get("out_sharding")
      self.assertIsNotNone(names, f"{path} has no logical axis names")
      self.assertLen(names, var.get_value().ndim, f"{path}: {names}")

  @parameterized.parameters(((4, 5, 8), 24), ((4, 5, 24), 8), ((7, 16), 16))
  def test_linear_dot_gradients_match_plain_matmul(self, x_shape, out):
    # layers.linear_dot picks which operand to transpose for dW (CPU speed);
    # values and both gradients must be those of x @ w.
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (x_shape[-1], out))
    g = jax.random.normal(kg, x_shape[:-1] + (out,))
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    ours = lambda x, w: jnp.sum(layers.linear_dot(x, w, dims) * g)
    plain = lambda x, w: jnp.sum(jnp.einsum("...i,io->...o", x, w) * g)
    np.testing.assert_allclose(layers.linear_dot(x, w, dims), x @ w, rtol=1e-6, atol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
      self.assertEqual(got.shape, want.shape)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

  def test_exact_gelu_matches_float64_erf(self):
    # The erf form (faster on XLA CPU than jax.nn.gelu's erfc) must keep the
    # exact GELU's values and gradients, tails included.
    x = np.linspace(-12, 12, 2001)
    erf = np.vectorize(math.erf)
    want = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    got = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
    grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x, jnp.float32))
    want_grad = 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, atol=2e-6, rtol=2e-6)

  def test_no_qkv_bias(self):
    """query / key / value lose their biases, the out projection keeps its own."""
    def names(model):
      return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    plain, bare = names(tiny()), names(tiny(qkv_bias=False))
    gone = {f"blocks/{i}/attn/{n}/bias" for i in range(2) for n in ("query", "key", "value")}
    self.assertLessEqual(gone, plain)
    self.assertEqual(bare, plain - gone)
    self.assertIn("blocks/0/attn/out/bias", bare)
    self.assertEqual(tiny(qkv_bias=False)(jnp.ones((1, 8, 8, 3)))[0].shape, (1, 5))

  def test_swiglu_mlp(self):
    model = tiny(mlp="swiglu", mlp_dim=24)
    mlp = model.blocks[0].mlp
    self.assertIsInstance(mlp, layers.SwiGLU)
    self.assertEqual([getattr(mlp, n).kernel.shape for n in ("gate", "fc1", "fc2")],
                     [(16, 24), (16, 24), (24, 16)])
    self.assertEqual(mlp.gate.kernel.get_metadata()["out_sharding"], ("embed", "mlp"))
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    dense = lambda layer, x: x @ layer.kernel[...] + layer.bias[...]
    want = dense(mlp.fc2, jax.nn.silu(dense(mlp.gate, x)) * dense(mlp.fc1, x))
    np.testing.assert_allclose(mlp(x), want, atol=1e-5)
    self.assertIsInstance(tiny(pool="map", mlp="swiglu").map_head.mlp, layers.Mlp)

  @parameterized.parameters("cls", "gap", "map")
  def test_registers_are_prefix_tokens(self, pool):
    model = tiny(num_registers=3, pool=pool, head_zero_init=False)
    prefix = 3 + (pool == "cls")
    self.assertEqual(model.num_prefix_tokens, prefix)
    self.assertEqual(model.registers.shape, (1, 3, 16))
    self.assertEqual(model.pos_embedding.shape, (1, 16, 16))  # none for the registers
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    logits, aux = model(x)
    self.assertEqual(aux["tokens"].shape, (2, 16, 16))  # one per patch
    # encode_tokens of all of embed's tokens is the forward pass (drop_tokens)
    tokens, _ = model.embed(x)
    encoded = model.encode_tokens(tokens)
    self.assertEqual(encoded.shape, (2, prefix + 16, 16))
    np.testing.assert_allclose(encoded[:, prefix:], aux["tokens"], atol=1e-5)
    if pool == "cls":
      np.testing.assert_allclose(encoded[:, 0], aux["pre_logits"], atol=1e-5)
    if pool == "gap":  # over the patch tokens only
      np.testing.assert_allclose(aux["tokens"].mean(1), aux["pre_logits"], atol=1e-5)
    self.assertEqual(model.encode_tokens(tokens[:, :5]).shape, (2, prefix + 5, 16))
    # the registers change the output (they are attended to) ...
    with nnx.use_eager_sharding(False):
      other = nnx.clone(model)
    other.registers.set_value(5 * jax.random.normal(jax.random.key(2), (1, 3, 16)))
    self.assertGreater(float(jnp.abs(other(x)[1]["tokens"] - aux["tokens"]).max()), 1e-4)
    # ... and mask tokens still replace the masked patches only (mask_tokens)
    mask = jnp.zeros((2, 16), bool).at[:, 0].set(True)
    token = jnp.ones((16,))
    _, masked = model(x, token_mask=mask, mask_token=token)
    _, changed = model(x.at[:, :2, :2].add(3.0), token_mask=mask, mask_token=token)
    np.testing.assert_allclose(masked["tokens"], changed["tokens"], atol=1e-5)
    self.assertGreater(float(jnp.abs(masked["tokens"] - aux["tokens"]).max()), 1e-4)
    # any image size: the registers stay, the patch grid follows the image
    _, big = model(jnp.ones((1, 12, 12, 3)))
    self.assertEqual(big["tokens"].shape, (1, 36, 16))

  def test_posemb_resample_option(self):
    model = tiny(posemb_resample="bicubic")
    images = jax.random.normal(jax.random.key(2), (1, 12, 12, 3))
    x, grid = model.embed(images)
    patches = model.embedding(model.patchify(images))
    want = layers.resample_posemb(model.pos_embedding[...], (4, 4), (6, 6), "bicubic")
    np.testing.assert_allclose(x - patches, jnp.broadcast_to(want, x.shape), atol=1e-5)
    self.assertEqual(grid, (6, 6))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ConfigError, "not divisible by config.model.patch_size=4"):
      tiny(patch_size=4)(jnp.ones((1, 10, 10, 3)))
    with self.assertRaisesRegex(ConfigError, "not divisible by config.model.patch_size=3"):
      tiny(patch_size=3)
    with self.assertRaisesRegex(ConfigError, "config.model.variant='X/16'"):
      tiny(variant="X/16")
    with self.assertRaisesRegex(ConfigError, r"expects images \[batch, height, width, 3\]"):
      tiny()(jnp.ones((1, 8, 8, 1)))
    with self.assertRaisesRegex(ConfigError, r"config.model.mlp='glu'; valid: mlp, swiglu"):
      tiny(mlp="glu")
    with self.assertRaisesRegex(ConfigError, r"config.model.posemb_resample='cubic'; valid: "
                                             r"bilinear, bicubic, bicubic_antialias"):
      tiny(posemb_resample="cubic")
    with self.assertRaisesRegex(ConfigError, "config.model.depht is not a field of model 'vit'"):
      MODELS.build("vit", {"depht": 3}, field="config.model", rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ConfigError, "config.model.name='vitt' is not a known model; valid names: perceiver, swin, vit"):
      MODELS.get("vitt")


if __name__ == "__main__":
  absltest.main()
