"""Data and metrics are never silently wrong (issue 19):

- a tie or a NaN is never a hit: classification, kNN, linear probe, zero-shot,
  retrieval and segmentation rank as argmax / top_k do (equal scores to the
  lower index, NaN ahead of every number) and a NaN score of the right answer
  is a miss, so an all-zero head scores argmax's choice and a NaN head zero;
- image_folder gives every split the same class indices, those of the train
  split (or of an explicit `classes` list), and a class folder they lack is an
  error naming the class and the split;
- an undecodable image (empty, text, truncated, corrupt) is one error line
  naming its file, also from grain worker processes; with decode
  on_error='skip' it is replaced deterministically (the next readable example
  in training, padding in evaluation), logged once and counted, and file names
  never reach a batch;
- an image smaller than the crop is an error naming its file and both sizes.
"""
import io
import os
import re
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from PIL import Image

from big_vision_like import configuration
from big_vision_like import data
from big_vision_like.evaluators import EVALUATORS
from big_vision_like.evaluators import common
from big_vision_like.evaluators import segmentation
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.registry import ConfigError

NAN = float("nan")
EMBED = 8
_ARRAYS = {}  # in-memory splits by key, served by the source below


@data.SOURCES.register("faults_arrays")
class ArraySource:
  """Elements of `_ARRAYS[key]`: a dict of equal-length arrays."""

  def __init__(self, split: str, data_dir=None, key: str = ""):
    del split, data_dir
    self.arrays = _ARRAYS[key]

  def __len__(self):
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


class Constant(nnx.Module):
  """Every head of every objective gives the same `value` (0 or NaN) everywhere."""

  num_classes = 3  # segmentation classes

  def __init__(self, value: float):
    self.value = nnx.Param(jnp.float32(value))

  def classify(self, images):
    return jnp.zeros((images.shape[0], 10)) + self.value

  def features(self, images):
    return images.reshape(images.shape[0], -1) * self.value

  def embed_image(self, images):
    return jnp.full((images.shape[0], EMBED), EMBED ** -0.5) + 0 * self.value

  def embed_text(self, tokens):
    return jnp.full((tokens.shape[0], EMBED), EMBED ** -0.5)

  def segment(self, images):
    return jnp.zeros((*images.shape[:3], self.num_classes)) + self.value


def run_evaluator(name, value, data_config, **kwargs):
  mesh = mesh_lib.make_mesh(configuration.defaults().mesh)
  config = ml_collections.ConfigDict({"split": "test", "batch_size": 64, "num_workers": 0,
                                      "transforms": [{"name": "normalize"}], **data_config})
  evaluator = EVALUATORS.get(name)(config, mesh=mesh, field="config.evals.t", **kwargs)
  graphdef, params, other = nnx.split(Constant(value), nnx.Param, ...)
  with jax.set_mesh(mesh):
    return evaluator.run(graphdef, (params, other))


def digits_labels():
  return data.build_source({"source": "digits", "split": "test"}, "c").labels


DIGITS = {"source": "digits"}


class TiesAndNaNsAreNeverHitsTest(parameterized.TestCase):

  def test_ranks_follow_argmax_ties_to_the_lower_index_nan_first(self):
    scores = jnp.array([[0., 0., 0., 0.],
                        [1., 3., 3., 2.],
                        [1., NAN, 3., 2.],
                        [0., 5., 1., 0.],
                        [1., 2., NAN, 0.]])
    labels = jnp.array([2, 2, 2, 1, 2])
    ranks = np.asarray(common.label_ranks(scores, labels))
    np.testing.assert_array_equal(ranks, [2, 1, 1, 0, common.NEVER])
    order = np.asarray(jax.lax.top_k(scores, 4)[1])  # top_k's (and argmax's) order
    np.testing.assert_array_equal(
        ranks[:4], [list(o).index(label) for o, label in zip(order[:4], labels[:4])])

  def test_a_label_outside_the_scored_classes_is_a_miss(self):
    ranks = common.label_ranks(jnp.zeros((2, 3)), jnp.array([3, -1]))
    np.testing.assert_array_equal(np.asarray(ranks), [common.NEVER] * 2)

  @parameterized.named_parameters(("zero_head", 0.0), ("nan_head", NAN))
  def test_classification_scores_argmax_choice_or_zero(self, value):
    labels = digits_labels()
    metrics = run_evaluator("classification", value, DIGITS)
    zero = value == 0
    self.assertAlmostEqual(metrics["accuracy"], np.mean(labels == 0) if zero else 0.0)
    self.assertAlmostEqual(metrics["top5_accuracy"], np.mean(labels < 5) if zero else 0.0)

  def test_knn_with_nan_features_scores_zero(self):
    metrics = run_evaluator("knn", NAN, DIGITS, k=5, max_train_examples=200)
    self.assertEqual(metrics, {"accuracy": 0.0, "top5_accuracy": 0.0})

  def test_linear_probe_with_nan_features_scores_zero(self):
    metrics = run_evaluator("linear_probe", NAN, DIGITS, optimizer="adam", steps=2,
                            max_train_examples=200)
    self.assertEqual(metrics, {"accuracy": 0.0, "train_accuracy": 0.0})

  @parameterized.named_parameters(("equal_scores", 0.0), ("nan_scores", NAN))
  def test_zeroshot_scores_argmax_choice_or_zero(self, value):
    labels = digits_labels()
    metrics = run_evaluator("zeroshot", value, {**DIGITS, "tokenizer": {
        "name": "bytes", "max_len": 16}})
    zero = value == 0
    self.assertAlmostEqual(metrics["accuracy"], np.mean(labels == 0) if zero else 0.0)
    self.assertAlmostEqual(metrics["top5_accuracy"], np.mean(labels < 5) if zero else 0.0)

  @parameterized.named_parameters(("collapsed", 0.0), ("nan", NAN))
  def test_retrieval_ties_go_to_the_lower_index_and_nan_is_a_miss(self, value):
    n = 10
    _ARRAYS["retrieval"] = {"image": np.zeros((n, 4, 4, 1), np.float32),
                            "text": np.ones((n, 1, 5), np.int32)}
    metrics = run_evaluator("retrieval", value, {"source": "faults_arrays",
                                                 "key": "retrieval", "batch_size": 8,
                                                 "transforms": []}, ks=(1, 5))
    # All similarities equal: query i's answer ranks i-th (i lower indices first).
    for k in (1, 5):
      expected = k / n if value == 0 else 0.0
      self.assertAlmostEqual(metrics[f"i2t_recall@{k}"], expected, msg=k)
      self.assertAlmostEqual(metrics[f"t2i_recall@{k}"], expected, msg=k)

  def test_segmentation_pixels_with_nan_logits_are_misses(self):
    mask = np.zeros((6, 4, 4), np.uint8)
    mask[:, :2] = 1
    mask[:, 0, 0] = 255  # ignored
    _ARRAYS["seg"] = {"image": np.zeros((6, 4, 4, 3), np.float32), "mask": mask}
    metrics = run_evaluator("segmentation", NAN, {"source": "faults_arrays", "key": "seg",
                                                  "batch_size": 4, "transforms": []})
    self.assertEqual(metrics["pixel_accuracy"], 0.0)
    self.assertEqual(metrics["mean_iou"], 0.0)
    # The same pixels with an all-zero head: argmax picks class 0 everywhere.
    metrics = run_evaluator("segmentation", 0.0, {"source": "faults_arrays", "key": "seg",
                                                  "batch_size": 4, "transforms": []})
    self.assertAlmostEqual(metrics["pixel_accuracy"], 8 / 15)

  def test_segmentation_scores_count_unpredicted_pixels_as_misses(self):
    out = segmentation.scores(np.array([[3.0, 1.0], [0.0, 2.0]]), np.array([0.0, 2.0]))
    self.assertAlmostEqual(out["iou_0"], 3 / 4)
    self.assertAlmostEqual(out["iou_1"], 2 / 5)  # TP 2, FP 1, FN 2 (unpredicted)
    self.assertAlmostEqual(out["pixel_accuracy"], 5 / 8)


def write_png(path, size=8, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def write_tree(root, layout, size=8):
  """layout: {split: {class: number of images}}."""
  for split, classes in layout.items():
    for c, n in classes.items():
      for i in range(n):
        write_png(os.path.join(root, split, c, f"{i}.png"), size, seed=i)


def source_config(path, split="train", **kw):
  return ml_collections.ConfigDict({"source": "image_folder", "data_dir": path,
                                    "split": split, **kw})


def as_kind(d, root, kind):
  """`root` itself, or a tar of it."""
  if kind == "dir":
    return root
  path = os.path.join(d, "ds.tar")
  with tarfile.open(path, "w") as tar:
    tar.add(root, arcname="data/ds")
  return path


class ImageFolderClassesTest(parameterized.TestCase):

  @parameterized.parameters("dir", "tar")
  def test_a_class_missing_from_test_shifts_no_label(self, kind):
    with tempfile.TemporaryDirectory() as d:
      root = os.path.join(d, "ds")
      write_tree(root, {"train": {"cat": 2, "dog": 1, "fox": 1}, "test": {"cat": 1, "fox": 2}})
      path = as_kind(d, root, kind)
      train = data.build_source(source_config(path), "c")
      test = data.build_source(source_config(path, "test"), "c")
    self.assertEqual(train.classes, ["cat", "dog", "fox"])
    self.assertEqual(test.classes, train.classes)
    self.assertEqual(test.num_classes, 3)
    np.testing.assert_array_equal(test.labels, [0, 2, 2])  # fox stays 2

  @parameterized.parameters("dir", "tar")
  def test_a_class_folder_the_train_split_lacks_is_an_error(self, kind):
    with tempfile.TemporaryDirectory() as d:
      root = os.path.join(d, "ds")
      write_tree(root, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "emu": 1}})
      with self.assertRaisesRegex(
          ConfigError, r"^config.evals.t \(source 'image_folder'.*split 'test' has class "
          r"folder 'emu', but the 'train' split has no such folder"):
        data.build_source(source_config(as_kind(d, root, kind), "test"), "config.evals.t")

  def test_an_explicit_classes_list_sets_the_indices_of_every_split(self):
    with tempfile.TemporaryDirectory() as d:
      write_tree(d, {"train": {"cat": 1, "dog": 1}, "test": {"dog": 1}})
      names = ["dog", "cat", "emu"]
      train = data.build_source(source_config(d, classes=names), "c")
      test = data.build_source(source_config(d, "test", classes=names), "c")
      self.assertEqual((train.classes, train.num_classes), (names, 3))
      np.testing.assert_array_equal(train.labels, [1, 0])
      np.testing.assert_array_equal(test.labels, [0])
      with self.assertRaisesRegex(ConfigError, "split 'train' has class folder 'dog', but "
                                  r"classes=\[...\] does not list it"):
        data.build_source(source_config(d, classes=["cat"]), "c")

  def test_another_training_split_name_is_named_or_an_error(self):
    with tempfile.TemporaryDirectory() as d:
      write_tree(d, {"training": {"cat": 1, "dog": 1}, "validation": {"dog": 1}})
      with self.assertRaisesRegex(ConfigError, r"no 'train' split in .* to take the class "
                                  r"indices from \(it has training, validation\); set "
                                  r"class_split"):
        data.build_source(source_config(d, "validation"), "c")
      test = data.build_source(source_config(d, "validation", class_split="training"), "c")
      self.assertEqual(test.classes, ["cat", "dog"])
      np.testing.assert_array_equal(test.labels, [1])  # dog stays 1


def train_config(path, transforms, batch_size=4, **kw):
  return ml_collections.ConfigDict({
      "source": "image_folder", "data_dir": path, "split": "train",
      "batch_size": batch_size, "transforms": transforms, "num_workers": 0, **kw})


def jpeg_bytes(size=32):
  buf = io.BytesIO()
  pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buf, format="JPEG")
  return buf.getvalue()


def corrupt(blob):
  """The same bytes with 40 flipped in the middle of the compressed pixels (a small
  JPEG's middle can be its header: it then decodes, at another size)."""
  out = bytearray(blob)
  for k in range(len(out) // 2, len(out) // 2 + 40):
    out[k] ^= 0x55
  return bytes(out)


BAD_FILES = {"empty": b"", "text": b"a caption, not an image\n",
             "truncated": jpeg_bytes()[:1000], "corrupt": corrupt(jpeg_bytes())}
DECODE = [{"name": "decode"}, {"name": "normalize"}]
SKIP = [{"name": "decode", "on_error": "skip"}, {"name": "normalize"}]


def tree_with_bad_files(root, bad: dict[str, bytes], good_per_class=3):
  """Classes a and b with readable PNGs, plus `bad` files in class b; their paths."""
  write_tree(root, {"train": {"a": good_per_class, "b": good_per_class}})
  paths = []
  for name, blob in bad.items():
    paths.append(os.path.join(root, "train", "b", f"bad_{name}.jpg"))
    with open(paths[-1], "wb") as f:
      f.write(blob)
  return paths


class UndecodableImagesTest(parameterized.TestCase):

  def first_error(self, config, batches=3):
    source = data.build_source(config, "config.input")
    iterator = data.train_iterator(config, source, seed=0)
    try:
      with self.assertRaises(ConfigError) as raised:
        for _ in range(batches):
          next(iterator)
    finally:
      if hasattr(iterator, "close"):
        iterator.close()
    return str(raised.exception)

  @parameterized.parameters(*BAD_FILES)
  def test_each_kind_of_bad_file_is_one_error_line_naming_it(self, kind):
    with tempfile.TemporaryDirectory() as d:
      [path] = tree_with_bad_files(d, {kind: BAD_FILES[kind]}, good_per_class=2)
      message = self.first_error(train_config(d, DECODE, batch_size=5))
    self.assertStartsWith(message, f"cannot decode image {path}: ")
    self.assertNotIn("\n", message)
    self.assertNotIn("BytesIO", message)

  def test_the_error_crosses_worker_processes(self):
    with tempfile.TemporaryDirectory() as d:
      [path] = tree_with_bad_files(d, {"text": BAD_FILES["text"]}, good_per_class=2)
      message = self.first_error(train_config(d, DECODE, batch_size=5, num_workers=1))
    self.assertStartsWith(message, f"cannot decode image {path}: ")

  def test_a_bad_on_error_is_a_config_error(self):
    with self.assertRaisesRegex(ConfigError, r"transforms\[0\].on_error='ignore' is not one "
                                             "of raise, skip"):
      data.train_dataset(ml_collections.ConfigDict({
          "source": "digits", "split": "train", "batch_size": 8,
          "transforms": [{"name": "decode", "on_error": "ignore"}]}),
          data.build_source({"source": "digits", "split": "train"}, "c"), seed=0)

  def test_skipping_yields_full_batches_and_logs_each_file_once_with_a_count(self):
    with tempfile.TemporaryDirectory() as d:
      bad = tree_with_bad_files(d, {"text": BAD_FILES["text"], "empty": b""})
      config = train_config(d, [{"name": "decode", "on_error": "skip"}])
      source = data.build_source(config, "c")
      readable = {source[i]["image"] for i in range(len(source))} - {b"", BAD_FILES["text"]}
      readable = [np.asarray(Image.open(io.BytesIO(b))) for b in readable]
      iterator = data.train_iterator(config, source, seed=0)
      with self.assertLogs(level="WARNING") as logs:
        batches = [next(iterator) for _ in range(6)]  # 3 epochs of 8 files
    for batch in batches:
      self.assertEqual(set(batch), {"image", "label"})  # no '_path'
      self.assertEqual(batch["image"].shape, (4, 8, 8, 3))
      for image in batch["image"]:
        self.assertTrue(any(np.array_equal(image, r) for r in readable))
    warnings = [r.getMessage() for r in logs.records if "skipped an example" in r.getMessage()]
    self.assertLen(warnings, 2)  # each file once, though every epoch meets it
    self.assertEqual(sorted(w.split(": ")[1].removeprefix("cannot decode image ")
                            for w in warnings), sorted(bad))
    self.assertTrue(any("2 undecodable file(s) skipped so far" in w for w in warnings))

  def test_skipping_is_deterministic_resumable_and_worker_independent(self):
    with tempfile.TemporaryDirectory() as d:
      tree_with_bad_files(d, {"text": BAD_FILES["text"], "truncated": BAD_FILES["truncated"]})
      config = train_config(d, [{"name": "decode", "on_error": "skip"},
                                {"name": "random_crop", "size": 6}, {"name": "normalize"}])
      source = data.build_source(config, "c")
      first = data.train_iterator(config, source, seed=1)
      expected = [next(first)["image"] for _ in range(4)]
      again = data.train_iterator(config, source, seed=1)
      next(again)
      state = again.get_state()
      resumed = data.train_iterator(config, source, seed=1)
      resumed.set_state(state)
      np.testing.assert_array_equal(next(resumed)["image"], expected[1])
      config.num_workers = 2
      workers = data.train_iterator(config, source, seed=1)
      try:
        for image in expected:
          np.testing.assert_array_equal(next(workers)["image"], image)
      finally:
        workers.close()

  def test_skipped_examples_are_padding_in_evaluation(self):
    with tempfile.TemporaryDirectory() as d:
      tree_with_bad_files(d, {"corrupt": BAD_FILES["corrupt"], "empty": b""})
      config = train_config(d, SKIP, batch_size=5)
      source = data.build_source(config, "c")
      with self.assertLogs(level="WARNING"):
        batches = list(data.eval_batches(config, source, "c"))
    self.assertLen(batches, 2)
    self.assertEqual(sum(float(b["_mask"].sum()) for b in batches), 6.0)
    labels = np.concatenate([b["label"][b["_mask"] > 0] for b in batches])
    np.testing.assert_array_equal(np.sort(labels), [0, 0, 0, 1, 1, 1])


class SmallerThanTheCropTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("center_crop", {"name": "center_crop", "size": 8}, "8x8", "(6x6)"),
      ("random_crop", {"name": "random_crop", "size": 8}, "8x8", "(6x6)"),
      ("random_crop_padded", {"name": "random_crop", "size": 10, "padding": 1}, "10x10",
       "(6x6, 8x8 with padding 1)"))
  def test_an_image_smaller_than_the_crop_names_its_file_and_both_sizes(
      self, crop, crop_size, image_size):
    with tempfile.TemporaryDirectory() as d:
      write_tree(d, {"train": {"a": 2, "b": 2}}, size=6)
      config = train_config(d, [{"name": "decode"}, crop])
      source = data.build_source(config, "c")
      with self.assertRaises(ConfigError) as raised:
        next(data.train_iterator(config, source, seed=0))
    message = str(raised.exception)
    self.assertRegex(message, rf"^{crop['name']} size {crop_size} is larger than image "
                              rf"{re.escape(d)}/train/[ab]/[01].png ")
    self.assertIn(image_size, message)
    self.assertNotIn("\n", message)


if __name__ == "__main__":
  absltest.main()
