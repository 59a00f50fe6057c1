"""models.inspect: the recomputed attention weights are the ones the model uses."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from big_vision_like.models import inspect, vit


def make(scan: bool, pool: str = "gap"):
  with nnx.use_eager_sharding(False):
    return vit.ViT(num_classes=3, patch_size=2, width=16, depth=2, num_heads=2, mlp_dim=32,
                   image_size=8, channels=1, pool=pool, scan=scan, rngs=nnx.Rngs(0))


class InspectTest(parameterized.TestCase):

  @parameterized.parameters("gap", "cls")
  def test_weights_reproduce_the_attention_output(self, pool):
    model = make(scan=False, pool=pool)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    maps = inspect.attention_maps(model, images)
    tokens = 16 + (pool == "cls")
    self.assertLen(maps, 2)
    self.assertEqual(maps[0].shape, (2, 2, tokens, tokens))
    np.testing.assert_allclose(maps[1].sum(-1), 1.0, atol=1e-5)
    # Block 0: weights @ values through the output projection = the model's attention.
    x = model.add_cls(model.embed(images)[0])
    block = model.blocks[0]
    h = block.norm1(x)
    v = block.attn.value(h).reshape(2, tokens, 2, 8)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", maps[0], v).reshape(2, tokens, 16)
    np.testing.assert_allclose(block.attn.out(mixed), block.attn(h), atol=1e-5)

  def test_scanned_blocks_unstack_to_the_same_encoder(self):
    model = make(scan=True)
    images = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    x = model.add_cls(model.embed(images)[0])
    expected = model.encode(x, train=False, rng=None)
    for block in inspect.blocks(model):
      x = block(x, 0.0, jax.random.key(0), False)
    np.testing.assert_allclose(x, expected, atol=1e-5)
    maps = inspect.attention_maps(model, images)
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, atol=1e-5)

  def test_token_similarity_is_cosine(self):
    model = make(scan=False)
    images = jax.random.normal(jax.random.key(3), (1, 8, 8, 1))
    sim = inspect.token_similarity(model, images)
    self.assertEqual(sim.shape, (1, 16, 16))
    np.testing.assert_allclose(jnp.diagonal(sim, axis1=1, axis2=2), 1.0, atol=1e-5)
    tokens = np.asarray(model(images)[1]["tokens"][0], np.float64)
    a, b = tokens[3], tokens[7]
    np.testing.assert_allclose(sim[0, 3, 7], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               atol=1e-5)


if __name__ == "__main__":
  absltest.main()
