"""config.init: starting a run from another run's checkpoint (transfer.py), at step 0
only: what is loaded, left at init, resampled or refused, and that a resume ignores it."""
import importlib
import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import safetensors.numpy
from absl.testing import absltest
from flax import nnx

from big_vision_like import checkpoint as checkpoint_lib
from big_vision_like import train, transfer
from big_vision_like.models import hf_checkpoint, layers
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.registry import ConfigError
from tests import helpers, test_parity

sys.path.insert(0, helpers.REPO)

# A tiny supervised ViT with a learned position embedding (8x8 grid, patch 1).
SOURCE = {"model.posemb": "learn", "optim.warmup_steps": 0, "total_steps": 2,
          "checkpoint_every_steps": 1, "keep_checkpoints": 10}


def tiny(**overrides):
  config = helpers.tiny_config(**{**SOURCE, **overrides})
  config.evals = {}
  return config


def initialised(config):
  """(fresh init state, state after config.init) of a run of `config`, as train._run
  makes them."""
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
    trainer = train.Trainer(config, mesh, steps_per_epoch=1)
    fresh = jax.device_get(trainer.init_state())
    return fresh, transfer.apply(config, trainer, trainer.init_state())


def flat(state, section="params"):
  """{path under `section`: numpy array}, paths as the checkpoint names them."""
  return {name.removeprefix(section + "/"): np.asarray(v)
          for name, v in checkpoint_lib._flat(jax.device_get(state)).items()  # pylint: disable=protected-access
          if name.startswith(section + "/")}



def pretrain(config_name: str, root: str) -> str:
  """Two steps of a bundled config's smoke setting, checkpointed, no evaluators."""
  config = importlib.import_module(f"configs.{config_name}").get_config("smoke")
  config.total_steps, config.checkpoint_every_steps, config.evals = 2, 2, {}
  config.optim.warmup_steps = 0
  workdir = os.path.join(root, config_name.split("_")[0])
  train.train_and_evaluate(config, workdir)
  return workdir

class TransferTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One root per process: pytest-xdist may run this class's tests in two workers.
    cls.root = tempfile.mkdtemp(prefix="transfer_", dir=absltest.get_default_test_tmpdir())
    cls.source = os.path.join(cls.root, "supervised")
    train.train_and_evaluate(tiny(), cls.source)
    cls.saved = flat(helpers.restore_state(cls.source, 2)[1])
    cls.saved_step1 = flat(helpers.restore_state(cls.source, 1)[1])

  def init(self, **overrides):
    return tiny(**{"init.path": self.source, "seed": 1, **overrides})

  def test_backbone_is_loaded_and_another_head_left_at_init(self):
    config = self.init(**{"model.num_classes": 12, "optim.ema_decay": 0.9})
    with self.assertLogs(level="INFO") as logs:
      fresh, state = initialised(config)
    params, before = flat(state), flat(fresh)
    backbone = [n for n in params if not n.startswith("backbone/head/")]
    self.assertLen(backbone, len(self.saved) - 2)
    for name in backbone:
      np.testing.assert_array_equal(params[name], self.saved[name], err_msg=name)
    self.assertFalse(np.array_equal(before["backbone/embedding/kernel/value"],  # seed 1
                                    self.saved["backbone/embedding/kernel/value"]))
    self.assertEqual(params["backbone/head/kernel/value"].shape, (16, 12))
    np.testing.assert_array_equal(params["backbone/head/kernel/value"], 0)
    np.testing.assert_array_equal(params["backbone/head/kernel/value"],
                                  before["backbone/head/kernel/value"])
    ema = flat(state, "ema_params")
    for name in params:
      np.testing.assert_array_equal(ema[name], params[name], err_msg=name)
    table = "\n".join(logs.output)
    self.assertIn("Initialised from " + os.path.join(self.source, "checkpoints", "2"), table)
    self.assertRegex(table, r"loaded\s+%d  backbone/" % len(backbone))
    self.assertRegex(table, r"left at init\s+2  backbone/head/bias \(classes 10 -> 12\)")
    self.assertRegex(table, r"skipped\s+0")

  def test_indexed_blocks_into_scanned_ones_and_back(self):
    config = self.init(**{"model.scan": True})
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    params = flat(state)
    blocks = sorted({n.split("/", 3)[3] for n in self.saved if n.startswith("backbone/blocks/")})
    self.assertNotEmpty(blocks)
    for rest in blocks:
      np.testing.assert_array_equal(params[f"backbone/blocks/{rest}"],
                                    self.saved[f"backbone/blocks/0/{rest}"][None], rest)
    self.assertRegex("\n".join(logs.output), r"left at init\s+0\n")
    self.assertIn("(stacked blocks)", "\n".join(logs.output))
    scanned = os.path.join(self.root, "scanned")
    train.train_and_evaluate(tiny(**{"model.scan": True}), scanned)
    saved = flat(helpers.restore_state(scanned)[1])
    _, state = initialised(tiny(**{"init.path": scanned}))
    for rest in blocks:
      np.testing.assert_array_equal(flat(state)[f"backbone/blocks/0/{rest}"],
                                    saved[f"backbone/blocks/{rest}"][0], rest)

  def test_a_step_and_skip(self):
    config = self.init(**{"init.path": self.source + ":1", "init.skip": ("embedding",)})
    with self.assertLogs(level="INFO") as logs:
      fresh, state = initialised(config)
    params, before = flat(state), flat(fresh)
    for name in params:
      want = before if "embedding" in name else self.saved_step1
      np.testing.assert_array_equal(params[name], want[name], err_msg=name)
    self.assertFalse(np.array_equal(self.saved_step1["backbone/norm/scale/value"],
                                    self.saved["backbone/norm/scale/value"]))
    self.assertRegex("\n".join(logs.output), r"skipped\s+3  backbone/embedding/bias, ")

  def test_mae_backbone_into_supervised(self):
    workdir = pretrain("mae_cifar10", self.root)
    saved = flat(helpers.restore_state(workdir)[1])
    config = tiny(**{"init.path": workdir, "model.patch_size": 2, "model.pool": "gap"})
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    params = flat(state)
    mae_backbone = [n for n in saved if n.startswith("backbone/")]
    self.assertNotEmpty(mae_backbone)
    for name in mae_backbone:
      np.testing.assert_array_equal(params[name], saved[name], err_msg=name)
    self.assertRegex("\n".join(logs.output),
                     r"left at init\s+2  backbone/head/bias \(not in the source\)")

  def test_dino_teacher_backbone_into_supervised(self):
    workdir = pretrain("dino_cifar10", self.root)
    saved = flat(helpers.restore_state(workdir)[1], "other")
    student = flat(helpers.restore_state(workdir)[1])
    self.assertFalse(np.array_equal(student["student/backbone/embedding/kernel/value"],
                                    saved["teacher/backbone/embedding/kernel/value"]))
    config = tiny(**{"init.path": workdir, "model.patch_size": 2, "model.pool": "cls"})
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    params = flat(state)
    teacher = [n for n in saved if n.startswith("teacher/backbone/")]
    self.assertNotEmpty(teacher)
    for name in teacher:  # the teacher's, as DINO evaluates, not the student's
      np.testing.assert_array_equal(params[name.removeprefix("teacher/")], saved[name],
                                    err_msg=name)
    self.assertIn("'teacher/backbone' -> 'backbone'", "\n".join(logs.output))
    # Into another DINO run: its student and its teacher both start from it.
    config = helpers.config_from("configs/dino_cifar10.py:smoke")
    config.init.path, config.evals = workdir, {}
    _, state = initialised(config)
    other, params = flat(state, "other"), flat(state)
    for name in teacher:
      np.testing.assert_array_equal(other[name], saved[name], err_msg=name)
      np.testing.assert_array_equal(params[name.replace("teacher/", "student/", 1)],
                                    saved[name], err_msg=name)

  def test_learned_position_embedding_is_resampled_to_a_new_grid(self):
    config = self.init(**{"model.image_size": 12})
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    got = flat(state)["backbone/pos_embedding/value"]
    want = layers.resample_posemb(self.saved["backbone/pos_embedding/value"], (8, 8), (12, 12))
    self.assertEqual(got.shape, (1, 144, 16))
    np.testing.assert_allclose(got, want, atol=1e-6)
    self.assertRegex("\n".join(logs.output), r"resampled\s+1  backbone/pos_embedding "
                     r"\(grid 8x8 -> 12x12, bilinear\)")

  def test_swin_bias_tables_are_resampled_to_another_window(self):
    swin = {"name": "swin", "num_classes": 10, "patch_size": 1, "embed_dim": 8,
            "depths": (1,), "num_heads": (2,), "image_size": 8, "channels": 1}
    source = os.path.join(self.root, "swin")
    train.train_and_evaluate(tiny(**{"model": {**swin, "window_size": 4}, "total_steps": 1}),
                             source)
    saved = flat(helpers.restore_state(source)[1])
    config = tiny(**{"model": {**swin, "window_size": 2}, "init.path": source})
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    tables = [n for n in saved if n.endswith("bias_table/value")]
    self.assertNotEmpty(tables)
    for name in tables:
      want = layers.resample_posemb(saved[name][None], (7, 7), (3, 3), method="bicubic")[0]
      np.testing.assert_allclose(flat(state)[name], want, atol=1e-6, err_msg=name)
    self.assertRegex("\n".join(logs.output), r"resampled\s+%d  backbone/\S+bias_table "
                     r"\(window 4 -> 2, bicubic\)" % len(tables))

  def test_bad_input_is_a_one_line_error_and_nothing_is_written(self):
    not_a_run = self.create_tempdir().full_path
    with open(os.path.join(not_a_run, "notes.txt"), "w") as f:
      f.write("x")
    cases = [
        ({"init.path": os.path.join(not_a_run, "nope")}, "no such directory"),
        ({"init.path": not_a_run}, r"is neither a workdir of this codebase \(config.json \+ "
         r"checkpoints/\) nor a HuggingFace / timm checkpoint directory .*; it has: "
         r"notes.txt$"),
        ({"init.path": self.source + ":7"}, r"no checkpoint 7 in .*; it has 1, 2$"),
        ({"init.source": "nope"},
         r"config.init.source='nope' is not in the checkpoint .*; it has: backbone$"),
        ({"init.target": "backbone/nope"}, r"config.init.target='backbone/nope' is not in "
         r"this run .*; it has: backbone/blocks, backbone/embedding"),
        ({"init.skip": ("head", "hed")},
         r"config.init.skip regex 'hed' matches no parameter of 'backbone' in this run$"),
        ({"model.mlp_dim": 48}, r"^config.init: this run's config.model.mlp_dim=48 but the "
         r"checkpoint's is 32 \(.*/checkpoints/2\); set it, or --config.init.model=True "
         r"to take the checkpoint's architecture$"),
        # Same shapes, another function: refused too.
        ({"model.mlp_activation": "quick_gelu", "model.ln_eps": 1e-5},
         r"^config.init: this run's config.model.ln_eps=1e-05 but the checkpoint's is "
         r"1e-06 \(also mlp_activation\)"),
        ({"model.mlp_dim": 48, "init.source": "backbone/blocks",
          "init.target": "backbone/blocks"},
         r"^config.init: backbone/blocks/0/mlp/\S+ has shape \([\d, ]*32[\d, ]*\) in .* "
         r"but \([\d, ]*48[\d, ]*\) in this run \(config.model\); change config.model "
         r"to match, or list it in config.init.skip$"),
        ({"optim.frozen": ("backbone/nope",)},
         r"^config.optim.frozen: 'backbone/nope' matches no parameter"),
    ]
    for overrides, message in cases:
      with self.subTest(overrides):
        with self.assertRaisesRegex(ConfigError, message):
          initialised(self.init(**overrides))
        workdir = os.path.join(self.root, "never_written")
        with self.assertRaisesRegex(ConfigError, message):
          train.train_and_evaluate(self.init(**overrides), workdir)
        self.assertFalse(os.path.exists(workdir))

  def test_step_0_evaluation_equals_the_source_runs_final_evaluation(self):
    evals = helpers.tiny_config().evals
    source = tiny()
    source.evals = evals
    final = train.train_and_evaluate(source, self.source)  # trained: evaluates step 2
    self.assertIn("eval/test/accuracy", final)
    config = self.init(**{"eval_at_start": True, "total_steps": 1})
    config.evals = evals
    workdir = os.path.join(self.root, "step0")
    train.train_and_evaluate(config, workdir)
    start = {k: v for r in helpers.read_metrics(workdir) if r["step"] == 0
             for k, v in r.items() if k.startswith("eval/")}
    self.assertEqual(start, {k: v for k, v in final.items() if k in start})
    self.assertEqual(set(start), {k for k in final if k.startswith("eval/test/")})

  def test_a_probe_of_a_supervised_run_keeps_its_backbone(self):
    config = self.init(**{"objective": {"name": "probe"}, "optim.name": "lars",
                          "optim.weight_decay": 0.0, "optim.lr": 0.5})
    workdir = os.path.join(self.root, "probe")
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(config, workdir)
    state = helpers.restore_state(workdir, 2)[1]
    frozen, trained = flat(state, "other"), flat(state, "params")
    backbone = [n for n in self.saved if not n.startswith("backbone/head/")]
    for name in backbone:  # loaded, then two steps that did not touch it
      np.testing.assert_array_equal(frozen[name], self.saved[name], err_msg=name)
    self.assertEqual(set(trained), {"head/kernel/value", "head/bias/value"})
    self.assertGreater(np.abs(trained["head/kernel/value"]).max(), 0)
    self.assertRegex("\n".join(logs.output), r"Training 170 of \d[\d,]* parameters")

  def test_a_resume_restores_its_own_checkpoint_not_the_init(self):
    config = self.init(**{"model.num_classes": 12})
    straight = os.path.join(self.root, "finetune")
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(config, straight)
    self.assertTrue(any("Initialised from" in m for m in logs.output))
    with open(os.path.join(straight, "config.json")) as f:
      self.assertEqual(json.load(f)["init"]["path"], self.source)
    # What a run killed after its step-1 checkpoint leaves behind.
    resumed = os.path.join(self.root, "finetune_resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "2"))
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(config, resumed)
    self.assertFalse(any("Initialised from" in m for m in logs.output))
    self.assertTrue(any("Resumed from" in m for m in logs.output), logs.output[:5])
    a, b = helpers.restore_state(straight, 2)[1], helpers.restore_state(resumed, 2)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
    self.assertEqual(helpers.train_losses(straight), helpers.train_losses(resumed))


HF_DIRS = os.path.join(os.path.dirname(__file__), "fixtures", "hf_dirs")


class HuggingFaceInitTest(absltest.TestCase):
  """config.init.path at a HuggingFace / timm checkpoint directory (tiny random models
  saved by save_pretrained / timm, with their reference outputs: fixtures/hf_dirs)."""

  def hf_config(self, name, **overrides):
    converted = hf_checkpoint.convert(hf_checkpoint.read(os.path.join(HF_DIRS, name)))
    config = tiny(**{"init.path": os.path.join(HF_DIRS, name)})
    config.model = dict(converted.model)
    for key, value in overrides.items():
      config.model[key] = value
    return config, converted

  def logits(self, config, images):
    mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
    with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
      trainer = train.Trainer(config, mesh, steps_per_epoch=1)
      state = transfer.apply(config, trainer, trainer.init_state())
      objective = nnx.merge(trainer.graphdef, *trainer.eval_state(state))
      return np.asarray(objective.classify(jax.numpy.asarray(images)))

  def test_a_fine_tuning_run_starts_as_the_hf_model_predicts(self):
    config, _ = self.hf_config("vit")
    with np.load(os.path.join(HF_DIRS, "vit", "expected.npz")) as f:
      expected = dict(f)
    with self.assertLogs(level="INFO") as logs:
      logits = self.logits(config, expected["pixel_values_nhwc"])
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5, rtol=0)
    table = "\n".join(logs.output)
    self.assertIn("(HF ViTForImageClassification (model_type 'vit'), 2 layers, width 32, "
                  "'backbone' -> 'backbone'; 0 source parameters unused)", table)
    self.assertRegex(table, r"left at init\s+0")

  def test_init_model_takes_the_checkpoints_architecture(self):
    config = tiny(**{"init.path": os.path.join(HF_DIRS, "vit"), "init.model": True,
                     "model.num_classes": 3, "model.image_size": 48})
    transfer.resolve_model(config)  # what train_and_evaluate does first
    with self.assertLogs(level="INFO") as logs:
      initialised(config)
    _, converted = self.hf_config("vit")
    for key, value in converted.model.items():
      if key not in transfer.RUN_FIELDS:
        self.assertEqual(config.model[key], value, key)
    self.assertEqual((config.model.num_classes, config.model.image_size), (3, 48))
    self.assertNotIn("head_zero_init", config.model)  # this run's: a new head starts at 0
    self.assertEqual(config.model.width, 32)
    self.assertRegex("\n".join(logs.output), r"resampled\s+1  backbone/pos_embedding "
                     r"\(grid 4x4 -> 6x6, bicubic\)")

  def test_another_grid_and_class_count(self):
    config, converted = self.hf_config("timm_vit", image_size=48, num_classes=3)
    with self.assertLogs(level="INFO") as logs:
      _, state = initialised(config)
    pos = converted.params["backbone"]["pos_embedding"]
    want = layers.resample_posemb(pos, (4, 4), (6, 6), method="bicubic_antialias")
    np.testing.assert_allclose(flat(state)["backbone/pos_embedding/value"], want, atol=1e-6)
    table = "\n".join(logs.output)
    self.assertIn("backbone/pos_embedding (grid 4x4 -> 6x6, bicubic_antialias)", table)
    self.assertRegex(table, r"left at init\s+2  backbone/head/bias \(classes 5 -> 3\)")

  def test_a_clip_checkpoint_into_a_clip_run_both_towers(self):
    hf_config, state_dict, inputs, expected = test_parity.load_arrays("clip")
    directory = self.create_tempdir().full_path
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(hf_config, f)
    safetensors.numpy.save_file(state_dict, os.path.join(directory, "model.safetensors"))
    converted = hf_checkpoint.convert(hf_checkpoint.read(directory))
    config = tiny(**{"init.path": directory, "init.source": "all", "init.target": "all"})
    config.model, config.objective = converted.model, converted.objective
    config.input.transforms = [{"name": "tokenize"}]
    config.input.tokenizer.max_len = hf_config["text_config"]["max_position_embeddings"]
    mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
    with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
      trainer = train.Trainer(config, mesh, steps_per_epoch=1)
      with self.assertLogs(level="INFO") as logs:
        state = transfer.apply(config, trainer, trainer.init_state())
      objective = nnx.merge(trainer.graphdef, *trainer.eval_state(state))
      image = objective.embed_image(jax.numpy.asarray(inputs["pixel_values_nhwc"]))
      text = objective.embed_text(jax.numpy.asarray(inputs["input_ids"]))
    np.testing.assert_allclose(image, expected["image_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text, expected["text_embeds"], atol=1e-5, rtol=0)
    table = "\n".join(logs.output)
    self.assertIn("'all' -> 'all'; 0 source parameters unused", table)
    self.assertRegex(table, r"left at init\s+0")

  def test_bad_input_is_one_line(self):
    config, _ = self.hf_config("vit", width=48, num_heads=4)
    with self.assertRaisesRegex(ConfigError, r"^config.init: this run's config.model.width=48 "
                                r"but the checkpoint's is 32 \(.*hf_dirs/vit\); set it, or "
                                r"--config.init.model=True to take the checkpoint's "
                                r"architecture$"):
      initialised(config)
    config.init.update(source="backbone/blocks", target="backbone/blocks")
    with self.assertRaisesRegex(ConfigError, r"^config.init: backbone/blocks/\S+ has shape .* "
                                r"in .*hf_dirs/vit but .* in this run \(config.model\); the "
                                r"checkpoint's model is \{'name': 'vit', .*'width': 32"):
      initialised(config)
    config.init.update(source="", target="")
    torch_only = self.create_tempdir().full_path
    shutil.copy(os.path.join(HF_DIRS, "vit", "config.json"), torch_only)
    open(os.path.join(torch_only, "pytorch_model.bin"), "wb").close()
    config.init.path = torch_only
    with self.assertRaisesRegex(ConfigError, r"pytorch_model.bin.*safetensors[^\n]*$"):
      initialised(config)
    config.init.path = os.path.join(HF_DIRS, "vit") + ":3"
    with self.assertRaisesRegex(ConfigError, "checkpoint directory has no steps$"):
      initialised(config)


if __name__ == "__main__":
  absltest.main()
