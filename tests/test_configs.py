"""Every config in configs/ runs in its smoke setting; the digits default reaches 95%."""
import importlib.util
import os

from absl.testing import absltest, parameterized

from big_vision_like import train
from big_vision_like.registry import ConfigError
from tests import helpers

CONFIG_DIR = os.path.join(helpers.REPO, "configs")
CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py")
                 and "def get_config(" in open(os.path.join(CONFIG_DIR, f)).read())


# The datasets of ../shared/data each source's configs read.
SHARED_DATA = {"image_folder": "cifar10_jpeg.tar.gz", "oxford_pets": "oxford_pets3.tar",
               "idx": "fashion_mnist", "coco_captions": "coco_mini.tar"}


def load(name, arg):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


class ConfigsTest(parameterized.TestCase):

  def test_every_config_is_covered(self):
    self.assertContainsSubset(["default.py", "vit_cifar10.py", "vit_fashion_mnist.py",
                               "vit_i1k.py"], CONFIGS)

  @parameterized.named_parameters((c[:-3], c) for c in CONFIGS)
  def test_smoke(self, name):
    module, config = load(name, "smoke")
    self.assertIn("python -m main --config=configs/" + name, module.__doc__)
    # Configs hold no data paths: give each source that needs one this machine's copy.
    for data in (config.input, *(ev.data for ev in config.evals.values())):
      source = data.get("source", config.input.source)
      if source in SHARED_DATA and not data.get("data_dir"):
        path = os.path.join(helpers.REPO, "..", "shared", "data", SHARED_DATA[source])
        if not os.path.exists(path):
          self.skipTest(f"{name} reads {os.path.abspath(path)}, absent on this machine")
        data.data_dir = os.path.abspath(path)
    workdir = self.create_tempdir().full_path
    if config.input.source == "tfds":
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        final = train.train_and_evaluate(config, workdir)
    else:
      final = train.train_and_evaluate(config, workdir)
    self.assertTrue(any(k.endswith(("/accuracy", "/mean_iou")) for k in final), final)
    records = helpers.read_metrics(workdir)
    self.assertEqual(max(r["step"] for r in records), config.total_steps)

  def test_a_config_without_its_data_dir_is_one_line(self):
    _, config = load("vit_cifar10.py", "smoke")
    with self.assertRaisesRegex(ConfigError, r"^config.input.data_dir is not set: source "
                                r"'image_folder' reads `<root>/<split>/<class>/<image>` .*; "
                                r"pass --config.input.data_dir=PATH$"):
      train.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_default_reaches_95_percent(self):
    """The embedded default, unchanged, as README's first command runs it."""
    if os.environ.get("BVL_SKIP_SLOW"):
      self.skipTest("BVL_SKIP_SLOW is set: the 3-minute digits run is skipped on request")
    _, config = load("default.py", None)
    final = train.train_and_evaluate(config, self.create_tempdir().full_path)
    self.assertGreaterEqual(final["eval/test/accuracy"], 0.95)


if __name__ == "__main__":
  absltest.main()
