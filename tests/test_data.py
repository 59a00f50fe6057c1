"""Sources read their public layouts; transforms keep image and mask aligned;
pipelines are deterministic, resumable and pad evaluation batches."""
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized
from ml_collections import ConfigDict
from PIL import Image

from big_vision_like import data
from big_vision_like.data import transforms
from big_vision_like.registry import ConfigError
from tests import helpers

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_image_tree(root, split="train", classes=("cat", "dog"), per_class=3, size=6):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(os.path.join(root, split, c), exist_ok=True)
    for i in range(per_class):
      pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.png"))


def cfg(**kw):
  base = dict(source="digits", split="train", batch_size=8, data_dir=None,
              transforms=[{"name": "normalize"}], num_workers=0)
  base.update(kw)
  return ConfigDict(base)


class SourcesTest(parameterized.TestCase):

  def test_digits_fixed_split(self):
    train, test = data.build_source(cfg(), "c"), data.build_source(cfg(split="test"), "c")
    self.assertEqual((len(train), len(test)), (1437, 360))
    self.assertEqual(train[0]["image"].shape, (8, 8, 1))
    self.assertEqual(train[0]["image"].dtype, np.uint8)
    self.assertEqual(int(train.images.max()), 255)
    again = data.build_source(cfg(), "c")
    np.testing.assert_array_equal(train.labels, again.labels)
    self.assertEqual(set(np.unique(test.labels)), set(range(10)))

  def test_idx_files(self):
    with tempfile.TemporaryDirectory() as d:
      images = np.arange(5 * 4 * 3).reshape(5, 4, 3) % 256
      write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), images)
      write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), np.array([0, 1, 2, 1, 0]))
      src = data.build_source(cfg(source="idx", split="test", data_dir=d), "c")
      self.assertLen(src, 5)
      np.testing.assert_array_equal(src[2]["image"][..., 0], images[2])
      self.assertEqual(int(src[3]["label"]), 1)
      with open(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01"))
      with self.assertRaisesRegex(ConfigError, "truncated"):
        data.build_source(cfg(source="idx", split="test", data_dir=d), "c")

  @absltest.skipUnless(os.path.isdir(os.path.join(SHARED, "fashion_mnist")),
                       "../shared/data/fashion_mnist is absent")
  def test_real_fashion_mnist(self):
    src = data.build_source(cfg(source="idx", split="test",
                                data_dir=os.path.join(SHARED, "fashion_mnist")), "c")
    self.assertLen(src, 10_000)
    self.assertEqual(src.num_classes, 10)
    self.assertAlmostEqual(float(src.images.mean()), 72.94, delta=1.0)

  @parameterized.parameters("dir", "tar", "tar.gz")
  def test_image_folder_layouts(self, kind):
    with tempfile.TemporaryDirectory() as d:
      root = os.path.join(d, "ds")
      make_image_tree(root)
      path = root
      if kind != "dir":
        path = os.path.join(d, f"ds.{kind}")
        with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tar:
          tar.add(root, arcname="ds")
      src = data.build_source(cfg(source="image_folder", data_dir=path), "c")
      self.assertLen(src, 6)
      self.assertEqual(src.classes, ["cat", "dog"])
      element = transforms.decode(src[4], None)
      self.assertEqual(element["image"].shape, (6, 6, 3))
      self.assertEqual(int(element["label"]), 1)
      expected = np.asarray(Image.open(os.path.join(root, "train", "dog", "1.png")))
      np.testing.assert_array_equal(element["image"], expected)

  def test_missing_and_bad_paths_name_the_field(self):
    with self.assertRaisesRegex(ConfigError, r"config.input.data_dir='/no/such' does not exist"):
      data.build_source(cfg(source="idx", data_dir="/no/such"), "config.input")
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(ConfigError, "config.evals.test .*no t10k-images"):
        data.build_source(cfg(source="idx", split="test", data_dir=d), "config.evals.test")
      with self.assertRaisesRegex(ConfigError, "no images under '<root>/train/<class>/'"):
        data.build_source(cfg(source="image_folder", data_dir=d), "config.input")
    with self.assertRaisesRegex(ConfigError, "config.input.source='imagenet' is not a known data source"):
      data.build_source(cfg(source="imagenet"), "config.input")
    with self.assertRaisesRegex(ConfigError, "config.input.tfds_nme is not a field of source 'tfds'"):
      data.build_source(cfg(source="tfds", tfds_nme="mnist"), "config.input")


class TransformsTest(parameterized.TestCase):

  def element(self):
    """Channel 0 holds the row, channel 1 the column; the mask holds row * 12 + col."""
    rows, cols = np.mgrid[:10, :12]
    image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    return {"image": image, "mask": (rows * 12 + cols).astype(np.uint8), "label": 3}

  @parameterized.parameters(
      ("random_crop", {"size": 6, "padding": 2}),
      ("random_resized_crop", {"size": 6}),
      ("flip_lr", {"p": 1.0}),
      ("center_crop", {"size": 4}),
  )
  def test_geometry_is_applied_to_image_and_mask_alike(self, name, kwargs):
    for seed in range(5):
      out = transforms.TRANSFORMS.get(name)(self.element(), np.random.default_rng(seed),
                                            **kwargs)
      self.assertEqual(out["image"].shape[:2], out["mask"].shape[:2])
      if name == "random_resized_crop":
        continue  # interpolation changes values; the shapes must still agree
      image, mask = out["image"].astype(int), out["mask"].astype(int)
      real = mask > 0  # constant-padded mask pixels are 0
      np.testing.assert_array_equal((image[..., 0] * 12 + image[..., 1])[real], mask[real])

  def test_resize_keeps_mask_labels_discrete(self):
    element = self.element()
    element["mask"] = (element["mask"] % 3).astype(np.uint8)
    out = transforms.resize(element, None, size=(23, 17))
    self.assertEqual(out["image"].shape, (23, 17, 3))
    self.assertTrue(set(np.unique(out["mask"])) <= {0, 1, 2})

  def test_normalize(self):
    out = transforms.normalize({"image": np.array([[[0, 255]]], np.uint8)}, None)
    np.testing.assert_allclose(out["image"], [[[-1.0, 1.0]]])
    out = transforms.normalize({"image": np.full((1, 1, 1), 255, np.uint8)}, None,
                               mean=[0.5], std=[0.25])
    np.testing.assert_allclose(out["image"], [[[2.0]]])

  def test_decode_bytes_and_channels(self):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), 200, np.uint8)).save(buf, format="PNG")
    out = transforms.decode({"image": buf.getvalue(), "label": 0}, None, channels=3)
    self.assertEqual(out["image"].shape, (4, 5, 3))
    with self.assertRaisesRegex(ValueError, "cannot decode image"):
      transforms.decode({"image": b"garbage", "label": 0}, None)

  def test_unknown_transform_or_argument(self):
    with self.assertRaisesRegex(ConfigError, r"config.input.transforms\[1\].name='flip' is not a known transform"):
      transforms.Preprocess([{"name": "normalize"}, {"name": "flip"}], "config.input.transforms")
    with self.assertRaisesRegex(ConfigError, r"transforms\[0\].sise is not a field of transform 'resize'"):
      transforms.Preprocess([{"name": "resize", "sise": 3}], "transforms")


class PipelineTest(absltest.TestCase):

  def test_deterministic_and_resumable(self):
    c = cfg(transforms=[{"name": "random_crop", "size": 8, "padding": 1}, {"name": "normalize"}])
    src = data.build_source(c, "c")
    a = data.train_iterator(c, src, seed=3)
    first = [next(a) for _ in range(3)]
    state = a.get_state()
    fourth = next(a)
    b = data.train_iterator(c, src, seed=3)
    for batch in first:
      np.testing.assert_array_equal(batch["image"], next(b)["image"])
    resumed = data.train_iterator(c, src, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], fourth["image"])
    other_seed = next(data.train_iterator(c, src, seed=4))
    self.assertFalse(np.array_equal(other_seed["label"], first[0]["label"]))

  def test_epochs_are_reshuffled_and_cover_the_data(self):
    c = cfg(batch_size=1437 // 3)  # 3 batches = one epoch of 1437 examples
    src = data.build_source(c, "c")
    it = data.train_iterator(c, src, seed=0)
    epoch1 = np.concatenate([next(it)["label"] for _ in range(3)])
    epoch2 = np.concatenate([next(it)["label"] for _ in range(3)])
    np.testing.assert_array_equal(np.bincount(epoch1), np.bincount(src.labels))
    self.assertFalse(np.array_equal(epoch1, epoch2))

  def test_eval_batches_pad_with_mask(self):
    c = cfg(split="test", batch_size=100)
    src = data.build_source(c, "c")
    batches = list(data.eval_batches(c, src, "c"))
    self.assertLen(batches, 4)
    self.assertEqual(sum(float(b["_mask"].sum()) for b in batches), 360.0)
    labels = np.concatenate([b["label"][b["_mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, src.labels)

  def test_worker_processes_give_the_same_batches(self):
    c = cfg(transforms=[{"name": "random_crop", "size": 8, "padding": 1}, {"name": "normalize"}])
    src = data.build_source(c, "c")
    inline = data.train_iterator(c, src, seed=1)
    expected = [next(inline)["image"] for _ in range(3)]
    c.num_workers = 2
    workers = data.train_iterator(c, src, seed=1)
    try:
      for e in expected:
        np.testing.assert_array_equal(next(workers)["image"], e)
    finally:
      workers.close()


class MissingExtraTest(absltest.TestCase):
  """An optional dependency that isn't installed is one line naming the extra."""

  def test_tfds_source_without_tensorflow_datasets(self):
    with mock.patch.dict(sys.modules, {"tensorflow_datasets": None}):
      with self.assertRaisesRegex(ConfigError, r"needs tensorflow-datasets: pip install "
                                               r"'big_vision_like\[tfds\]'"):
        data.build_source(cfg(source="tfds", tfds_name="mnist", split="test"), "config.input")

  def test_sentencepiece_tokenizer_without_sentencepiece(self):
    from big_vision_like.data import tokenizers  # pylint: disable=g-import-not-at-top
    with mock.patch.dict(sys.modules, {"sentencepiece": None}):
      with self.assertRaisesRegex(ConfigError, r"big_vision_like\[sentencepiece\]"):
        tokenizers.build_tokenizer({"name": "sentencepiece", "path": __file__, "max_len": 8})


if __name__ == "__main__":
  absltest.main()


class ArrayRecordTest(absltest.TestCase):

  def test_the_converter_defines_no_flags_on_import_and_runs_as_a_command(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    from big_vision_like.data import convert  # pylint: disable=g-import-not-at-top,unused-import
    for name in ("source", "data_dir", "splits", "out"):
      self.assertNotIn(name, flags.FLAGS)
    with tempfile.TemporaryDirectory() as d:
      proc = subprocess.run(
          [sys.executable, "-m", "big_vision_like.data.convert", "--source=digits",
           "--splits=test", f"--out={d}"], cwd=helpers.REPO, capture_output=True, text=True,
          timeout=120)
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      self.assertIn("test: 360 records", proc.stdout)
      self.assertLen(data.build_source(cfg(source="array_record", split="test", data_dir=d),
                                       "c"), 360)

  def test_convert_image_folder_and_read_back(self):
    from big_vision_like.data import convert  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as d:
      make_image_tree(os.path.join(d, "ds"), split="test")
      info = convert.convert("image_folder", os.path.join(d, "ds"), ["test"],
                             os.path.join(d, "ar"))
      self.assertEqual(info["splits"], {"test": 6})
      original = data.build_source(cfg(source="image_folder", split="test",
                                       data_dir=os.path.join(d, "ds")), "c")
      converted = data.build_source(cfg(source="array_record", split="test",
                                        data_dir=os.path.join(d, "ar")), "c")
      self.assertLen(converted, 6)
      self.assertEqual(converted.classes, ["cat", "dog"])
      for i in range(6):
        a, b = transforms.decode(original[i], None), transforms.decode(converted[i], None)
        np.testing.assert_array_equal(a["image"], b["image"])
        self.assertEqual(int(a["label"]), int(b["label"]))

  def test_convert_arrays_losslessly(self):
    from big_vision_like.data import convert  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as d:
      convert.convert("digits", None, ["test"], d)
      digits = data.build_source(cfg(split="test"), "c")
      converted = data.build_source(cfg(source="array_record", split="test", data_dir=d), "c")
      element = transforms.decode(converted[7], None, channels=1)
      np.testing.assert_array_equal(element["image"], digits[7]["image"])
