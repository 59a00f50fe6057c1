"""Image-text and self-distillation data: tokenizers lay ids out so the EOS can
be pooled, COCO captions read their public layout, transforms get the
tokenizer and class names from the pipeline, and DINO views are deterministic."""
import io
import json
import os
import pickle
import tarfile
import tempfile

import numpy as np
from absl.testing import absltest, parameterized
from ml_collections import ConfigDict
from PIL import Image

from big_vision_like import data
from big_vision_like.data import prompts, tokenizers, transforms
from big_vision_like.registry import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(REPO, "..", "shared", "data", "coco_mini.tar")
BYTES = {"name": "bytes", "max_len": 32, "path": ""}


def cfg(**kw):
  base = dict(source="digits", split="train", batch_size=8, data_dir=None,
              transforms=[{"name": "normalize"}], num_workers=0, tokenizer=BYTES)
  base.update(kw)
  return ConfigDict(base)


def pooled(tokens):
  """The position a text tower pools at: number of non-pad tokens - 1."""
  return int((np.asarray(tokens) != 0).sum(-1)) - 1


def make_image_tree(root, classes=("cat", "dog"), per_class=3, size=12):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(os.path.join(root, "train", c), exist_ok=True)
    for i in range(per_class):
      pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, "train", c, f"{i}.png"))


def train_sentencepiece(directory, **kwargs):
  adjectives = ["small", "large", "blurry", "bright", "red", "green", "old", "young"]
  nouns = ["cat", "dog", "bird", "horse", "table", "cake", "person", "plane", "boat"]
  sentences = [f"a {a} photo of a {n} near the {m}." for a in adjectives
               for n in nouns for m in nouns]
  import sentencepiece  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(directory, "sp")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=100,
      hard_vocab_limit=False, minloglevel=2, **kwargs)
  return prefix + ".model"


class TokenizerTest(parameterized.TestCase):

  def test_bytes_layout(self):
    tok = tokenizers.build_tokenizer({"name": "bytes", "max_len": 8})
    ids = tok.encode("hi")
    self.assertEqual(ids.dtype, np.int32)
    np.testing.assert_array_equal(ids, [ord("h") + 3, ord("i") + 3, 2, 0, 0, 0, 0, 0])
    self.assertEqual(ids[pooled(ids)], tok.eos_id)
    self.assertEqual(tok.vocab_size, 259)
    self.assertEqual(tok.decode(ids), "hi")
    self.assertEqual(tok.decode(tok.encode("Hi Ther")), "Hi Ther")  # case kept
    empty = tok.encode("")
    self.assertEqual((pooled(empty), int(empty[0])), (0, tok.eos_id))

  def test_bytes_truncation_keeps_eos(self):
    tok = tokenizers.BytesTokenizer(max_len=6)
    ids = tok.encode("a long caption")
    self.assertEqual(pooled(ids), 5)
    self.assertEqual(int(ids[5]), tok.eos_id)
    self.assertEqual(tok.decode(ids), "a lon")
    batch = tok.encode_batch(["a long caption", "x"])
    self.assertEqual((batch.shape, batch.dtype), ((2, 6), np.int32))
    np.testing.assert_array_equal(batch[0], ids)
    np.testing.assert_array_equal(batch[1], tok.encode("x"))

  def test_bytes_non_ascii(self):
    tok = tokenizers.BytesTokenizer(max_len=32)
    text = "Crème brûlée, 日本"
    ids = tok.encode(text)
    self.assertLen(ids[ids > 2], len(text.encode("utf-8")))
    self.assertEqual(tok.decode(ids), text)
    short = tokenizers.BytesTokenizer(max_len=5)  # 4 bytes: 'Cr' + 2 of 'è'
    cut = short.encode("Crème")
    self.assertEqual(short.decode(cut), "Crè")
    self.assertEqual(int(cut[pooled(cut)]), short.eos_id)
    self.assertEqual(short.decode(short.encode("日本")), "日")  # never half a character

  def test_sentencepiece_layout(self):
    with tempfile.TemporaryDirectory() as d:
      path = train_sentencepiece(d)
      tok = tokenizers.build_tokenizer({"name": "sentencepiece", "max_len": 10, "path": path})
      pieces = tok._sp.get_piece_size()  # pylint: disable=protected-access
      self.assertEqual(tok.vocab_size, pieces + 1)
      self.assertEqual(tok.eos_id, tok._sp.eos_id() + 1)  # pylint: disable=protected-access
      ids = tok.encode("a red photo of a cat.")
      self.assertEqual((ids.shape, ids.dtype), ((10,), np.int32))
      self.assertEqual(int(ids[pooled(ids)]), tok.eos_id)
      self.assertTrue(np.all(ids[:pooled(ids)] > 0))
      self.assertTrue(np.all(ids < tok.vocab_size))
      long_ids = tok.encode(" ".join(["a large cake near the boat"] * 5))
      self.assertEqual((pooled(long_ids), int(long_ids[-1])), (9, tok.eos_id))
      self.assertEqual(tok.decode(tok.encode("a dog.")), "a dog.")
      clone = pickle.loads(pickle.dumps(tok))  # grain workers get a copy
      np.testing.assert_array_equal(clone.encode("a dog."), tok.encode("a dog."))

  def test_sentencepiece_without_eos_gets_an_extra_id(self):
    with tempfile.TemporaryDirectory() as d:
      path = train_sentencepiece(d, eos_id=-1)
      tok = tokenizers.SentencePieceTokenizer(path, max_len=12)
      pieces = tok._sp.get_piece_size()  # pylint: disable=protected-access
      self.assertEqual((tok.vocab_size, tok.eos_id), (pieces + 2, pieces + 1))
      ids = tok.encode("a cat")
      self.assertEqual(int(ids[pooled(ids)]), pieces + 1)

  def test_errors(self):
    with self.assertRaisesRegex(ConfigError, r"c.tok.name='gpt' is not a known tokenizer; "
                                r"valid names: bytes, sentencepiece"):
      tokenizers.build_tokenizer({"name": "gpt"}, "c.tok")
    with self.assertRaisesRegex(ConfigError, r"cannot read sentencepiece model '/no/such.model'"):
      tokenizers.build_tokenizer({"name": "sentencepiece", "path": "/no/such.model"})
    with self.assertRaisesRegex(ConfigError, r"tokenizer.path must name"):
      tokenizers.build_tokenizer({"name": "sentencepiece"})
    with self.assertRaisesRegex(ConfigError, r"max_len=1 must be an int >= 2"):
      tokenizers.build_tokenizer({"name": "bytes", "max_len": 1})
    with self.assertRaisesRegex(ConfigError, r"tokenizer.vocab is not a tokenizer field"):
      tokenizers.build_tokenizer({"name": "bytes", "vocab": 3})
    with tempfile.NamedTemporaryFile(suffix=".model") as f:
      f.write(b"not a model")
      f.flush()
      with self.assertRaisesRegex(ConfigError, "is not a sentencepiece model"):
        tokenizers.build_tokenizer({"name": "sentencepiece", "path": f.name})


def write_coco(root, split="val"):
  """A tiny COCO layout: image 7 has two captions, image 3 one, image 9 none."""
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, f"{split}2017"))
  images = []
  for image_id in (7, 3, 9):
    name = f"{image_id:012d}.jpg"
    Image.fromarray(np.full((5, 6, 3), image_id * 20, np.uint8)).save(
        os.path.join(root, f"{split}2017", name))
    images.append({"id": image_id, "file_name": name})
  annotations = [{"image_id": 7, "id": 1, "caption": "first of seven "},
                 {"image_id": 3, "id": 2, "caption": "only one"},
                 {"image_id": 7, "id": 3, "caption": "second of seven"}]
  with open(os.path.join(root, "annotations", f"captions_{split}2017.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations}, f)


class CocoTest(absltest.TestCase):

  def test_layout_in_nested_tar_and_cyclic_captions(self):
    with tempfile.TemporaryDirectory() as d:
      write_coco(os.path.join(d, "coco"))
      path = os.path.join(d, "coco.tar")
      with tarfile.open(path, "w") as tar:
        tar.add(os.path.join(d, "coco"), arcname="data/coco")
      src = data.build_source(cfg(source="coco_captions", split="test", data_dir=path,
                                  captions_per_image=3), "c")
      self.assertLen(src, 2)  # image 9 has no caption
      self.assertEqual([int(src[i]["image_id"]) for i in range(2)], [3, 7])
      self.assertEqual(src[0]["text"], ["only one"] * 3)
      self.assertEqual(src[1]["text"], ["first of seven", "second of seven", "first of seven"])
      self.assertEqual(src[1]["image_id"].dtype, np.int32)
      image = np.asarray(Image.open(io.BytesIO(src[1]["image"])))
      self.assertEqual(image.shape, (5, 6, 3))
      self.assertFalse(hasattr(src, "classes") and src.classes)

  def test_missing_annotation_names_it(self):
    with tempfile.TemporaryDirectory() as d:
      write_coco(d, split="val")
      with self.assertRaisesRegex(ConfigError, r"no annotations/captions_train2017.json in"):
        data.build_source(cfg(source="coco_captions", data_dir=d), "c")
      with self.assertRaisesRegex(ConfigError, "split='minival' is not a COCO split"):
        data.build_source(cfg(source="coco_captions", split="minival", data_dir=d), "c")

  @absltest.skipUnless(os.path.exists(COCO), f"{COCO} is absent")
  def test_real_coco_mini(self):
    train = data.build_source(cfg(source="coco_captions", data_dir=COCO), "c")
    val = data.build_source(cfg(source="coco_captions", split="val", data_dir=COCO), "c")
    test = data.build_source(cfg(source="coco_captions", split="test", data_dir=COCO), "c")
    self.assertEqual((len(train), len(val), len(test)), (80, 79, 79))
    ids = [int(val[i]["image_id"]) for i in range(len(val))]
    self.assertEqual(ids, sorted(ids))
    self.assertEqual(ids, [int(test[i]["image_id"]) for i in range(len(test))])
    self.assertEqual(val[5]["text"], test[5]["text"])
    element = train[0]
    self.assertLen(element["text"], 5)
    self.assertTrue(all(isinstance(t, str) and t for t in element["text"]))
    self.assertEqual(transforms.decode(element, None)["image"].ndim, 3)

  @absltest.skipUnless(os.path.exists(COCO), f"{COCO} is absent")
  def test_real_coco_eval_batches(self):
    c = cfg(source="coco_captions", split="test", data_dir=COCO, batch_size=16,
            transforms=[{"name": "decode"}, {"name": "resize", "size": 32},
                        {"name": "normalize"}, {"name": "tokenize", "all_captions": True}])
    src = data.build_source(c, "c")
    batches = list(data.eval_batches(c, src, "c"))
    self.assertLen(batches, 5)  # 79 padded to 80
    first = batches[0]
    self.assertEqual(set(first), {"image", "text", "image_id", "_mask"})
    self.assertEqual((first["text"].shape, first["text"].dtype), ((16, 5, 32), np.int32))
    self.assertEqual(first["image"].shape, (16, 32, 32, 3))
    tok = tokenizers.BytesTokenizer(32)
    expected = src[0]["text"][2].encode("utf-8")[:31].decode("utf-8", "ignore")
    self.assertEqual(tok.decode(first["text"][0, 2]), expected)
    self.assertEqual(float(sum(b["_mask"].sum() for b in batches)), 79.0)


class ContextTest(absltest.TestCase):

  def test_class_caption_then_tokenize_through_train_dataset(self):
    with tempfile.TemporaryDirectory() as d:
      make_image_tree(d, per_class=4)
      c = cfg(source="image_folder", data_dir=d, batch_size=8,
              transforms=[{"name": "decode"}, {"name": "normalize"},
                          {"name": "class_caption"}, {"name": "tokenize"}])
      src = data.build_source(c, "c")
      batch = data.train_dataset(c, src, seed=0)[0]
    self.assertEqual(set(batch), {"image", "label", "text"})
    self.assertEqual((batch["text"].shape, batch["text"].dtype), ((8, 32), np.int32))
    tok = tokenizers.BytesTokenizer(32)
    used = set()
    for tokens, label in zip(batch["text"], batch["label"]):
      text = tok.decode(tokens)
      name = ["cat", "dog"][int(label)]
      self.assertIn(text, [t.format(name) for t in prompts.DEFAULT_TEMPLATES])
      used.add(text.replace(name, "{}"))
    self.assertGreater(len(used), 1)  # templates are drawn at random

  def test_idx_classes_name_labels(self):
    with tempfile.TemporaryDirectory() as d:
      from tests.test_data import write_idx  # pylint: disable=g-import-not-at-top
      write_idx(os.path.join(d, "train-images-idx3-ubyte.gz"), np.zeros((6, 4, 4)))
      write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), np.array([0, 1, 2, 0, 1, 2]))
      c = cfg(source="idx", data_dir=d, batch_size=6,
              classes=("T-shirt/top", "Trouser", "Pullover"),
              transforms=[{"name": "class_caption", "templates": ["{}!"]}, {"name": "tokenize"}])
      src = data.build_source(c, "c")
      self.assertEqual(src.classes, ("T-shirt/top", "Trouser", "Pullover"))
      batch = data.train_dataset(c, src, seed=0)[0]
      tok = tokenizers.BytesTokenizer(32)
      for tokens, label in zip(batch["text"], batch["label"]):
        self.assertEqual(tok.decode(tokens), src.classes[int(label)] + "!")
      self.assertEqual(data.build_source(cfg(source="idx", data_dir=d), "c").classes, ())
      with self.assertRaisesRegex(ConfigError, "classes has 2 names but .* labels up to 2"):
        data.build_source(cfg(source="idx", data_dir=d, classes=("a", "b")), "c")

  def test_missing_context_is_a_config_error(self):
    c = cfg(transforms=[{"name": "class_caption"}])
    digits = data.build_source(c, "c")

    class Unnamed:  # labels without class names
      def __len__(self):
        return len(digits)

      def __getitem__(self, i):
        return digits[i]

    with self.assertRaisesRegex(ConfigError, r"c.transforms\[0\]: transform 'class_caption' "
                                r"needs class names, but the data source has none"):
      data.train_dataset(c, Unnamed(), seed=0, field="c")
    c = cfg(tokenizer=None, transforms=[{"name": "normalize"}, {"name": "tokenize"}])
    with self.assertRaisesRegex(ConfigError, r"c.transforms\[1\]: transform 'tokenize' "
                                r"needs a tokenizer: set c.tokenizer"):
      data.train_dataset(c, data.build_source(c, "c"), seed=0, field="c")
    with self.assertRaisesRegex(ConfigError, "tokenize needs a tokenizer"):
      transforms.tokenize({"text": "a"}, None, tokenizer=None)
    with self.assertRaisesRegex(ConfigError, "class_caption needs class names"):
      transforms.class_caption({"label": 0}, np.random.default_rng(0), classes=())

  def test_tokenizer_in_a_transform_spec_is_rejected(self):
    with self.assertRaisesRegex(ConfigError, r"config.input.transforms\[1\].tokenizer cannot be "
                                r"set in a transform: it comes from"):
      transforms.Preprocess([{"name": "normalize"}, {"name": "tokenize", "tokenizer": BYTES}],
                            "config.input.transforms", {"tokenizer": None})
    with self.assertRaisesRegex(ConfigError, r"transforms\[0\].classes cannot be set"):
      transforms.Preprocess([{"name": "class_caption", "classes": ["a"]}], "transforms")

  def test_tokenize_picks_a_caption_or_keeps_all(self):
    tok = tokenizers.BytesTokenizer(16)
    captions = ["one", "two", "three", "four"]
    picked = {tok.decode(transforms.tokenize({"text": captions}, np.random.default_rng(s),
                                             tok)["text"]) for s in range(20)}
    self.assertGreater(len(picked), 1)
    self.assertTrue(picked <= set(captions))
    out = transforms.tokenize({"caption": captions, "label": 1}, None, tok, key="caption",
                              all_captions=True)
    self.assertNotIn("caption", out)
    np.testing.assert_array_equal(out["text"], tok.encode_batch(captions))

  def test_batches_hold_only_arrays(self):
    prep = transforms.Preprocess([], "t")
    out = prep.random_map({"image": np.zeros((2, 2, 1), np.uint8), "text": ["a", "b"],
                           "title": "x", "image_id": np.int32(4)}, np.random.default_rng(0))
    self.assertEqual(set(out), {"image", "image_id"})  # no 'label' invented, text dropped
    out = prep.random_map({"image": np.zeros(1), "label": 3}, np.random.default_rng(0))
    self.assertEqual(out["label"].dtype, np.int32)

  def test_default_config_has_a_tokenizer(self):
    from big_vision_like import configuration  # pylint: disable=g-import-not-at-top
    c = configuration.defaults()
    self.assertEqual(dict(c.input.tokenizer), BYTES)
    self.assertEqual(tokenizers.build_tokenizer(c.input.tokenizer).vocab_size, 259)


class AugmentTest(parameterized.TestCase):

  def image(self):
    return np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)

  @parameterized.parameters("color_jitter", "grayscale", "gaussian_blur", "solarize")
  def test_applied_with_p_1_and_not_with_p_0(self, name):
    fn = transforms.TRANSFORMS.get(name)
    image = self.image()
    for seed in range(3):
      out = fn({"image": image, "label": 2}, np.random.default_rng(seed), p=1.0)
      self.assertEqual((out["image"].shape, out["image"].dtype), (image.shape, np.uint8))
      self.assertGreater(np.abs(out["image"].astype(int) - image).mean(), 1.0)
      self.assertEqual(out["label"], 2)
      same = fn({"image": image}, np.random.default_rng(seed), p=0.0)
      np.testing.assert_array_equal(same["image"], image)

  def test_grayscale_and_solarize_values(self):
    image = self.image()
    grey = transforms.grayscale({"image": image}, np.random.default_rng(0), p=1.0)["image"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    sol = transforms.solarize({"image": image}, np.random.default_rng(0), p=1.0)["image"]
    np.testing.assert_array_equal(sol, np.where(image >= 128, 255 - image, image))

  def test_single_channel_images_stay_single_channel(self):
    image = self.image()[..., :1]
    for name in ("color_jitter", "grayscale", "gaussian_blur", "solarize"):
      out = transforms.TRANSFORMS.get(name)({"image": image}, np.random.default_rng(0), p=1.0)
      self.assertEqual(out["image"].shape, image.shape)

  def test_multi_crop_shapes_range_and_determinism(self):
    element = {"image": self.image(), "label": 1}
    out = transforms.multi_crop(element, np.random.default_rng(0), global_size=24,
                                local_size=8, num_local=4)
    self.assertEqual((out["image"].shape, out["image"].dtype), ((2, 24, 24, 3), np.float32))
    self.assertEqual((out["local_crops"].shape, out["local_crops"].dtype),
                     ((4, 8, 8, 3), np.float32))
    self.assertEqual(out["label"], 1)
    for key in ("image", "local_crops"):
      self.assertGreaterEqual(float(out[key].min()), -1.0)
      self.assertLessEqual(float(out[key].max()), 1.0)
    self.assertFalse(np.allclose(out["image"][0], out["image"][1]))
    again = transforms.multi_crop(element, np.random.default_rng(0), global_size=24,
                                  local_size=8, num_local=4)
    for key in ("image", "local_crops"):
      np.testing.assert_array_equal(out[key], again[key])
    other = transforms.multi_crop(element, np.random.default_rng(1), global_size=24,
                                  local_size=8, num_local=4)
    self.assertFalse(np.array_equal(out["image"], other["image"]))

  def test_multi_crop_normalizes_like_normalize_and_can_skip_locals(self):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    out = transforms.multi_crop({"image": self.image()}, np.random.default_rng(0),
                                global_size=16, local_size=8, num_local=0,
                                mean=mean, std=std)
    self.assertNotIn("local_crops", out)
    low = (0 - np.array(mean)) / std
    high = (1 - np.array(mean)) / std
    self.assertTrue(np.all(out["image"] >= low - 1e-5) and np.all(out["image"] <= high + 1e-5))
    self.assertLess(float(out["image"].min()), -1.0)  # not the default [-1, 1] scaling
    with self.assertRaisesRegex(ValueError, "put 'decode' before it"):
      transforms.multi_crop({"image": b"jpeg"}, np.random.default_rng(0), 8, 4)

  def test_multi_crop_through_the_training_pipeline(self):
    c = cfg(batch_size=4, transforms=[{"name": "decode", "channels": 3},
                                      {"name": "multi_crop", "global_size": 8,
                                       "local_size": 4, "num_local": 2}])
    batch = data.train_dataset(c, data.build_source(c, "c"), seed=0)[0]
    self.assertEqual(batch["image"].shape, (4, 2, 8, 8, 3))
    self.assertEqual(batch["local_crops"].shape, (4, 2, 4, 4, 3))
    self.assertEqual(batch["label"].dtype, np.int32)


if __name__ == "__main__":
  absltest.main()
