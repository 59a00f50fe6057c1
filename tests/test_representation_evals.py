"""kNN, linear probe, zero-shot and retrieval evaluators against numpy re-implementations.

A toy objective with closed-form `features` / `embed_image` / `embed_text`
lets each metric be recomputed in numpy from the raw data; evaluation batch
sizes leave a partial last batch, so the padding path is exercised.
"""
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from big_vision_like import evaluators as evaluators_lib
from big_vision_like.evaluators import common
from big_vision_like import configuration
from big_vision_like import data
from big_vision_like import train
from big_vision_like.data.prompts import DEFAULT_TEMPLATES, class_prompt
from big_vision_like.data.tokenizers import build_tokenizer
from big_vision_like.evaluators import EVALUATORS
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.registry import ConfigError
from tests import helpers

TOKENIZER = {"name": "bytes", "max_len": 24}
VOCAB = 259  # the bytes tokenizer's
EMBED = 16

# In-memory datasets by key, served by the test-only source below.
_DATASETS = {}


@data.SOURCES.register("test_representation_arrays")
class ArraySource:
  """Elements of `_DATASETS[key][split]`: a dict of equal-length arrays."""

  def __init__(self, split: str, data_dir=None, key: str = ""):
    del data_dir
    self.arrays = _DATASETS[key][split]
    if "classes" in _DATASETS[key]:
      self.classes = _DATASETS[key]["classes"]

  def __len__(self):
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


class Toy(nnx.Module):
  """features = pixels @ proj * scale; embeddings = normalised linear maps of pixels / tokens."""

  def __init__(self, pixels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.proj = nnx.Param(jnp.asarray(rng.normal(size=(pixels, pixels)), jnp.float32))
    self.scale = nnx.BatchStat(jnp.float32(2.0))  # a non-Param variable, as in `other`
    self.text = nnx.Param(jnp.asarray(rng.normal(size=(VOCAB, EMBED)), jnp.float32))

  def features(self, images):
    return images.reshape(images.shape[0], -1) @ self.proj * self.scale

  def embed_image(self, images):
    x = images.reshape(images.shape[0], -1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_text(self, tokens):
    return np_or_jnp_embed_text(jnp, self.text[...], tokens)


def np_or_jnp_embed_text(xp, table, tokens):
  """Sum of the (non-padding) tokens' rows, L2-normalised; shared by the toy and numpy."""
  counts = (tokens[..., None] == xp.arange(1, VOCAB)).sum(-2).astype(xp.float32)
  x = counts @ table[1:]
  return x / xp.linalg.norm(x, axis=-1, keepdims=True)


def split_state(toy):
  graphdef, params, other = nnx.split(toy, nnx.Param, ...)
  return graphdef, (params, other)


def build(name, data_config, **kwargs):
  mesh = mesh_lib.make_mesh(configuration.defaults().mesh)
  config = ml_collections.ConfigDict({"split": "test", "batch_size": 64,
                                      "transforms": [], "num_workers": 0, **data_config})
  return EVALUATORS.get(name)(config, mesh=mesh, field="config.evals.t", **kwargs), mesh


def digits_pixels(split):
  """Flattened digits as the `normalize` transform gives them, and labels."""
  source = data.build_source({"source": "digits", "split": split}, "c")
  return source.images.reshape(len(source), -1) / 127.5 - 1.0, source.labels


def ranked(scores):
  """Class indices by decreasing score; ties keep the lower index first."""
  return np.argsort(-scores, axis=1, kind="stable")


def numpy_knn(train_x, train_y, test_x, k, temperature, num_classes):
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = norm(test_x) @ norm(train_x).T
  nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(test_x), num_classes))
  for i, row in enumerate(nearest):
    np.add.at(votes[i], train_y[row], np.exp(sims[i, row] / temperature))
  return ranked(votes)


DIGITS = {"source": "digits", "transforms": [{"name": "normalize"}]}


class SortedByClass:
  """1,000 examples sorted by label, like an image folder."""

  def __len__(self):
    return 1000

  def __getitem__(self, i):
    return {"label": i // 100}


class KnnTest(parameterized.TestCase):

  @parameterized.parameters((20, 0.07, None), (5, 0.5, 300))
  def test_matches_numpy(self, k, temperature, max_train):
    toy = Toy(64)
    evaluator, mesh = build("knn", DIGITS, k=k, temperature=temperature,
                            max_train_examples=max_train)
    with jax.set_mesh(mesh):
      metrics = evaluator.run(*split_state(toy))
    train_x, train_y = digits_pixels("train")
    test_x, test_y = digits_pixels("test")
    if max_train:  # the evaluator's seeded subset, in source order
      keep = np.sort(np.random.default_rng(0).permutation(len(train_y))[:max_train])
      train_x, train_y = train_x[keep], train_y[keep]
    proj = np.asarray(toy.proj[...], np.float64) * 2.0
    predicted = numpy_knn(train_x @ proj, train_y, test_x @ proj, k, temperature, 10)
    accuracy = np.mean(predicted[:, 0] == test_y)
    top5 = np.mean((predicted[:, :5] == test_y[:, None]).any(1))
    self.assertEqual(sorted(metrics), ["accuracy", "top5_accuracy"])
    self.assertAlmostEqual(metrics["accuracy"], accuracy, places=6)
    self.assertAlmostEqual(metrics["top5_accuracy"], top5, places=6)
    self.assertGreater(metrics["accuracy"], 0.9)

  def test_subset_keeps_every_class_of_a_class_sorted_source(self):
    source = common.Subset(SortedByClass(), 50)
    labels = [source[i]["label"] for i in range(len(source))]
    self.assertLen(labels, 50)
    self.assertEqual(sorted(set(labels)), list(range(10)))
    self.assertEqual(labels, sorted(labels))  # still in source order

  def test_bad_k(self):
    with self.assertRaisesRegex(ConfigError, r"^config.evals.t.k=0 must be >= 1$"):
      build("knn", DIGITS, k=0)


class LinearProbeTest(parameterized.TestCase):

  @parameterized.parameters(("lbfgs", 0.1), ("adam", 0.05))
  def test_learns_digits(self, optimizer, lr):
    evaluator, mesh = build("linear_probe", DIGITS, optimizer=optimizer, lr=lr, steps=300)
    with jax.set_mesh(mesh):
      metrics = evaluator.run(*split_state(Toy(64)))
    self.assertEqual(sorted(metrics), ["accuracy", "train_accuracy"])
    self.assertGreater(metrics["accuracy"], 0.85)
    self.assertGreater(metrics["train_accuracy"], 0.95)

  def test_matches_a_numpy_classifier_on_its_own_fit(self):
    """The reported accuracies are those of the fitted weights on standardised features."""
    from big_vision_like.evaluators import linear_probe  # pylint: disable=g-import-not-at-top
    train_x, train_y = digits_pixels("train")
    test_x, test_y = digits_pixels("test")
    x_train, x_test = linear_probe.standardize(train_x, test_x)
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-6)
    params = linear_probe.fit(jnp.asarray(x_train, jnp.float32), jnp.asarray(train_y),
                              num_classes=10, steps=100, lr=0.1, weight_decay=1e-4,
                              optimizer="lbfgs")
    evaluator, mesh = build("linear_probe", DIGITS, steps=100)
    toy = Toy(64)
    toy.proj[...] = jnp.eye(64)
    toy.scale[...] = jnp.float32(1.0)
    with jax.set_mesh(mesh):
      metrics = evaluator.run(*split_state(toy))
    logits = x_test @ np.asarray(params["w"]) + np.asarray(params["b"])
    self.assertAlmostEqual(metrics["accuracy"], np.mean(logits.argmax(1) == test_y), places=6)

  def test_bad_optimizer(self):
    with self.assertRaisesRegex(ConfigError, r"^config.evals.t.optimizer='sgd' is not one of"):
      build("linear_probe", DIGITS, optimizer="sgd")


def class_embeddings(classes, templates):
  """numpy: mean over templates of the toy's text embedding, re-normalised."""
  tokenizer = build_tokenizer(TOKENIZER)
  table = np.asarray(Toy(64).text[...], np.float64)
  out = []
  for c in classes:
    tokens = tokenizer.encode_batch([class_prompt(t, c) for t in templates])
    mean = np_or_jnp_embed_text(np, table, tokens).mean(0)
    out.append(mean / np.linalg.norm(mean))
  return np.stack(out)


class ZeroShotTest(parameterized.TestCase):

  CLASSES = ("cat", "dog", "aquarium_fish", "truck", "ship", "frog")

  def make(self, key, templates, noise, with_classes=True):
    """Images are their class embedding plus noise (so the toy's embed_image recovers it)."""
    rng = np.random.default_rng(1)
    embeddings = class_embeddings(self.CLASSES, templates)
    labels = rng.integers(len(self.CLASSES), size=45).astype(np.int32)
    images = embeddings[labels] + noise * rng.normal(size=(45, EMBED))
    _DATASETS[key] = {"test": {"image": images.reshape(45, 4, 4, 1).astype(np.float32),
                               "label": labels}}
    if with_classes:
      _DATASETS[key]["classes"] = list(self.CLASSES)
    return images, labels, embeddings

  @parameterized.parameters((None, 0.0), (None, 0.35), (("a {} photo", "itap of a {}"), 0.35))
  def test_matches_numpy(self, templates, noise):
    key = f"zeroshot_{noise}_{templates is None}"
    images, labels, embeddings = self.make(key, templates or DEFAULT_TEMPLATES, noise)
    kwargs = {"templates": templates} if templates else {}
    evaluator, mesh = build("zeroshot", {"source": "test_representation_arrays", "key": key,
                                         "batch_size": 8, "tokenizer": TOKENIZER}, **kwargs)
    with jax.set_mesh(mesh):
      metrics = evaluator.run(*split_state(Toy(64)))
    predicted = ranked(images @ embeddings.T)
    self.assertAlmostEqual(metrics["accuracy"], np.mean(predicted[:, 0] == labels), places=6)
    self.assertAlmostEqual(metrics["top5_accuracy"],
                           np.mean((predicted[:, :5] == labels[:, None]).any(1)), places=6)
    if noise == 0:
      self.assertEqual(metrics["accuracy"], 1.0)
    else:
      self.assertLess(metrics["accuracy"], 1.0)

  def test_explicit_classes_and_missing_names(self):
    self.make("zeroshot_unnamed", DEFAULT_TEMPLATES, 0.0, with_classes=False)
    config = {"source": "test_representation_arrays", "key": "zeroshot_unnamed",
              "batch_size": 8, "tokenizer": TOKENIZER}
    with self.assertRaisesRegex(
        ConfigError, r"^config.evals.t.classes is not set and source "
        r"'test_representation_arrays' has no class names$"):
      build("zeroshot", config)
    evaluator, mesh = build("zeroshot", config, classes=self.CLASSES[:4])
    with jax.set_mesh(mesh):
      # Four classes: labels 4 and 5 are never predicted, and there is no top-5.
      metrics = evaluator.run(*split_state(Toy(64)))
    labels = _DATASETS["zeroshot_unnamed"]["test"]["label"]
    self.assertEqual(sorted(metrics), ["accuracy"])
    self.assertAlmostEqual(metrics["accuracy"], np.mean(labels < 4), places=6)


def numpy_recalls(images, captions, valid, ks):
  """The straightforward way: full similarity matrix, argsort, look for a hit."""
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  images = norm(images)
  flat = captions.reshape(-1, captions.shape[-1])
  owner = np.repeat(np.arange(len(images)), captions.shape[1])[valid.reshape(-1)]
  flat = flat[valid.reshape(-1)]
  sims = images @ flat.T
  out = {}
  for k in ks:
    top_captions = np.argsort(-sims, axis=1)[:, :k]
    i2t = [(owner[top_captions[i]] == i).any() for i in range(len(images)) if valid[i].any()]
    top_images = np.argsort(-sims.T, axis=1)[:, :k]
    t2i = [(top_images[c] == owner[c]).any() for c in range(len(flat))]
    out[f"i2t_recall@{k}"] = np.mean(i2t)
    out[f"t2i_recall@{k}"] = np.mean(t2i)
  return out


class RetrievalTest(absltest.TestCase):

  def test_matches_numpy(self):
    rng = np.random.default_rng(2)
    n, per_image, length = 21, 3, 10
    tokens = rng.integers(3, VOCAB, size=(n, per_image, length)).astype(np.int32)
    tokens[4, 1:] = 0  # image 4 has one caption, image 7 none
    tokens[7] = 0
    table = np.asarray(Toy(64).text[...], np.float64)
    with np.errstate(invalid="ignore"):  # caption rows of padding only: 0 / 0
      captions = np_or_jnp_embed_text(np, table, tokens.reshape(-1, length))
    captions = np.nan_to_num(captions).reshape(n, per_image, EMBED)
    images = captions.mean(1) + 0.25 * rng.normal(size=(n, EMBED))
    _DATASETS["retrieval"] = {"test": {"image": images.reshape(n, 4, 4, 1).astype(np.float32),
                                       "text": tokens}}
    evaluator, mesh = build("retrieval", {"source": "test_representation_arrays",
                                          "key": "retrieval", "batch_size": 8}, ks=(1, 5))
    with jax.set_mesh(mesh):
      metrics = evaluator.run(*split_state(Toy(64)))
    valid = (tokens != 0).any(-1)
    expected = numpy_recalls(images, captions, valid, (1, 5))
    self.assertEqual(sorted(metrics), sorted(expected))
    for key, value in expected.items():
      self.assertAlmostEqual(metrics[key], value, places=6, msg=key)
    self.assertLess(metrics["t2i_recall@1"], 1.0)
    self.assertGreater(metrics["t2i_recall@5"], metrics["t2i_recall@1"])


class BuildFromConfigTest(absltest.TestCase):

  def test_trainer_builds_all_four(self):
    config = helpers.tiny_config()
    with config.unlocked():
      config.input.tokenizer = TOKENIZER
      config.evals = {
          "knn": {"name": "knn", "k": 10, "max_train_examples": 100},
          "probe": {"name": "linear_probe", "steps": 50},
          "zs": {"name": "zeroshot", "classes": [str(i) for i in range(10)]},
          "ret": {"name": "retrieval", "ks": (1, 10)}}
    evaluators = train.build_evaluators(config, mesh_lib.make_mesh(config.mesh))
    self.assertEqual(evaluators["knn"][0].k, 10)
    self.assertLen(evaluators["knn"][0].train_source, 100)
    self.assertEqual(evaluators["probe"][0].steps, 50)
    self.assertEqual(evaluators["zs"][0].tokens.shape, (10 * len(DEFAULT_TEMPLATES), 24))
    self.assertEqual(evaluators["ret"][0].ks, (1, 10))

  def test_data_settings_merge_in_one_place(self):
    config = helpers.tiny_config()
    config.input.update(source="digits", batch_size=64, num_workers=2)
    merged = evaluators_lib.data_config(config.input, {"batch_size": 32, "split": None}, "f")
    # config.input, then the evaluation defaults, then the evaluator's own data.
    self.assertEqual((merged.source, merged.split, merged.batch_size, merged.num_workers),
                     ("digits", "test", 32, 0))
    self.assertEqual(merged.transforms, [{"name": "normalize"}])
    other = evaluators_lib.data_config(config.input, {"source": "idx", "data_dir": "/d"}, "f")
    self.assertNotIn("random_crop", str(other.transforms))  # nothing of config.input's
    self.assertEqual((other.source, other.batch_size), ("idx", 64))
    with self.assertRaisesRegex(ConfigError, r"^f.tokenizer: evaluators tokenize with "
                                             r"config.input.tokenizer"):
      evaluators_lib.data_config(config.input, {"tokenizer": TOKENIZER}, "f")

  def test_a_data_field_outside_data_is_named(self):
    config = helpers.tiny_config(**{"evals.test.batch_size": 8})
    with self.assertRaisesRegex(ConfigError, r"^config.evals.test.batch_size is a data "
                                             r"setting: set config.evals.test.data.batch_size"):
      train.build_evaluators(config, mesh_lib.make_mesh(config.mesh))


if __name__ == "__main__":
  absltest.main()
