"""Segmentation: the pets source, the mIoU evaluator against a hand count, the objective."""
import io
import os
import tarfile
import tempfile

import numpy as np
from absl.testing import absltest

import jax
import jax.numpy as jnp
from flax import nnx
from PIL import Image

from big_vision_like import data
from big_vision_like.evaluators import segmentation as seg_eval
from big_vision_like.objectives.segmentation import Segmentation
from big_vision_like.registry import ConfigError
from tests import helpers


def make_pets(root, names=("Abyssinian_1", "Bengal_2"), size=(6, 5)):
  os.makedirs(os.path.join(root, "images"))
  os.makedirs(os.path.join(root, "annotations", "trimaps"))
  for i, name in enumerate(names):
    Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(
        os.path.join(root, "images", name + ".jpg"))
    trimap = np.full(size, 2, np.uint8)
    trimap[1:3, 1:3] = 1
    trimap[0, 0] = 3
    Image.fromarray(trimap).save(os.path.join(root, "annotations", "trimaps", name + ".png"))
  with open(os.path.join(root, "annotations", "trainval.txt"), "w") as f:
    f.writelines(f"{n} {i + 1} 1 1\n" for i, n in enumerate(names))


class PetsSourceTest(absltest.TestCase):

  def test_trimap_mapping_in_dir_and_tar(self):
    with tempfile.TemporaryDirectory() as d:
      make_pets(os.path.join(d, "pets"))
      with tarfile.open(os.path.join(d, "pets.tar"), "w") as tar:
        tar.add(os.path.join(d, "pets"), arcname="oxford_pets3")
      for path in (os.path.join(d, "pets"), os.path.join(d, "pets.tar")):
        src = data.build_source({"source": "oxford_pets", "split": "train", "data_dir": path}, "c")
        self.assertLen(src, 2)
        element = src[1]
        self.assertEqual(int(element["label"]), 1)
        self.assertEqual(element["mask"][1, 1], 1)   # pet
        self.assertEqual(element["mask"][4, 4], 0)   # background
        self.assertEqual(element["mask"][0, 0], 255)  # border: ignored
      src = data.build_source({"source": "oxford_pets", "split": "train", "data_dir": path,
                               "border_class": 2}, "c")
      self.assertEqual(src[0]["mask"][0, 0], 2)
      self.assertEqual(src.num_classes, 3)

  def test_mask_size_must_match_image(self):
    from big_vision_like.data import transforms  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(buf, format="PNG")
    with self.assertRaisesRegex(ValueError, "mask is 6x4 but its image is 6x5"):
      transforms.decode({"image": buf.getvalue(), "mask": np.zeros((6, 4), np.uint8),
                         "label": 0}, None)

  @absltest.skipUnless(os.path.exists(os.path.join(helpers.REPO, "..", "shared", "data",
                                                   "oxford_pets3.tar")),
                       "../shared/data/oxford_pets3.tar is absent")
  def test_real_subset(self):
    path = os.path.join(helpers.REPO, "..", "shared", "data", "oxford_pets3.tar")
    train = data.build_source({"source": "oxford_pets", "split": "train", "data_dir": path}, "c")
    test = data.build_source({"source": "oxford_pets", "split": "test", "data_dir": path}, "c")
    self.assertEqual((len(train), len(test)), (300, 298))
    self.assertTrue(set(np.unique(test[0]["mask"])) <= {0, 1, 255})


class MeanIoUTest(absltest.TestCase):

  def test_against_a_hand_count(self):
    labels = jnp.array([[0, 0, 1, 1], [2, 2, 0, 1]])
    preds = jnp.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    weights = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])  # last pixel ignored
    confusion = np.asarray(seg_eval.confusion_matrix(labels, preds, weights, 3))
    np.testing.assert_array_equal(confusion, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    out = seg_eval.scores(confusion)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 2/3; class 2: 1/2
    self.assertAlmostEqual(out["iou_0"], 0.5)
    self.assertAlmostEqual(out["iou_1"], 2 / 3)
    self.assertAlmostEqual(out["iou_2"], 0.5)
    self.assertAlmostEqual(out["mean_iou"], (0.5 + 2 / 3 + 0.5) / 3)
    self.assertAlmostEqual(out["pixel_accuracy"], 5 / 7)

  def test_absent_class_is_not_averaged(self):
    out = seg_eval.scores(np.array([[3.0, 0, 0], [0, 1, 0], [0, 0, 0]]))
    self.assertAlmostEqual(out["mean_iou"], 1.0)


class SegmentationObjectiveTest(absltest.TestCase):

  def objective(self):
    config = helpers.tiny_config(**{"model.num_classes": 0, "model.patch_size": 2})
    with nnx.use_eager_sharding(False):
      return Segmentation(config, num_classes=3, rngs=nnx.Rngs(0))

  def test_logits_at_pixel_resolution_and_ignored_pixels(self):
    obj = self.objective()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    self.assertEqual(obj.segment(images).shape, (2, 8, 8, 3))
    mask = jnp.zeros((2, 8, 8), jnp.int32)
    loss_a, _ = obj.loss({"image": images, "mask": mask}, rng=jax.random.key(1), train=False)
    ignored = mask.at[:, :4].set(255).at[:, 4:].set(0)
    loss_b, _ = obj.loss({"image": images, "mask": ignored}, rng=jax.random.key(1), train=False)
    logits = obj.segment(images)
    expected = -jax.nn.log_softmax(logits)[:, 4:, :, 0].mean()
    self.assertAlmostEqual(float(loss_b), float(expected), places=5)
    self.assertNotAlmostEqual(float(loss_a), float(loss_b), places=5)

  def test_backbone_must_not_have_a_classifier(self):
    config = helpers.tiny_config()
    with self.assertRaisesRegex(ConfigError, "config.model.num_classes must be 0"):
      Segmentation(config, num_classes=2, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()


class TfdsPetsTest(absltest.TestCase):

  def test_tfds_masks_are_relabelled(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
      src = data.build_source({"source": "tfds", "split": "train", "tfds_name": "oxford_iiit_pet",
                               "mask_key": "segmentation_mask", "mask_map": (255, 1, 0, 255)},
                              "config.input")
      raw = data.build_source({"source": "tfds", "split": "train", "tfds_name": "oxford_iiit_pet",
                               "mask_key": "segmentation_mask"}, "config.input")
      element, original = src[0], raw[0]
    self.assertEqual(element["mask"].ndim, 2)
    lut = np.array([255, 1, 0, 255] + [255] * 252, np.uint8)
    np.testing.assert_array_equal(element["mask"], lut[original["mask"]])
