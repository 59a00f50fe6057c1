"""experiments/patch_scaling/run.py: the sweep's plan, bookkeeping and report."""
import importlib.util
import json
import os

import numpy as np
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = os.path.join(ROOT, "..", "shared", "data", "fashion_mnist")


def load_run_module():
  spec = importlib.util.spec_from_file_location(
      "patch_scaling_run", os.path.join(ROOT, "experiments", "patch_scaling", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


run = load_run_module()


def fake_run(path, total_steps, evals):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"total_steps": total_steps}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "train/loss": 2.0, "images_per_sec": 100.0}) + "\n")
    for step, loss in evals:
      f.write(json.dumps({"step": step, "eval/test/loss": loss,
                          "eval/test/accuracy": 1 - loss / 3}) + "\n")


class PatchScalingTest(absltest.TestCase):

  def test_plan_runs_cheap_patches_first_and_pixel_seeds_only_for_patch_1(self):
    plan = run.plan(["a", "b"], ["1", "4", "2"], ["0", "1"], ["7"])
    self.assertEqual([p for _, p, _ in plan], [4, 4, 4, 4, 2, 2, 2, 2, 1, 1])
    self.assertEqual({s for _, p, s in plan if p == 1}, {7})
    self.assertEqual({s for _, p, s in plan if p != 1}, {0, 1})

  def test_finished_means_evaluated_at_the_last_step(self):
    tmp = self.create_tempdir().full_path
    fake_run(os.path.join(tmp, "done"), 10, [(5, 2.0), (10, 1.5)])
    fake_run(os.path.join(tmp, "partial"), 10, [(5, 2.0)])
    self.assertIsNotNone(run.finished_records(os.path.join(tmp, "done")))
    self.assertIsNone(run.finished_records(os.path.join(tmp, "partial")))
    self.assertIsNone(run.finished_records(os.path.join(tmp, "missing")))
    self.assertEqual(run.final_eval(run.read_records(os.path.join(tmp, "done")))["step"], 10)

  def test_a_line_cut_short_by_a_kill_is_ignored(self):
    path = os.path.join(self.create_tempdir().full_path, "killed")
    fake_run(path, 10, [(5, 2.0)])
    with open(os.path.join(path, "metrics.jsonl"), "a") as f:
      f.write('{"step": 10, "eval/test/lo')
    self.assertEqual([r["step"] for r in run.read_records(path)], [1, 5])
    self.assertIsNone(run.finished_records(path))

  def test_summary_and_effect_against_seed_noise(self):
    losses = {(8, 0): 2.0, (8, 1): 2.2, (4, 0): 1.5, (4, 1): 1.9, (1, 0): 1.0}
    tmp = self.create_tempdir().full_path
    plan = [("d", p, s) for (p, s) in losses]
    for (p, s), loss in losses.items():
      fake_run(run.workdir(tmp, "d", p, s), 10, [(10, loss)])
    rows = run.collect(tmp, plan)
    summary = run.summarize(rows)
    self.assertEqual([s["patch"] for s in summary], [8, 4, 1])
    np.testing.assert_allclose(summary[0]["loss_mean"], 2.1)
    np.testing.assert_allclose(summary[1]["loss_std"], np.std([1.5, 1.9], ddof=1))
    self.assertIsNone(summary[2]["loss_std"])
    noise = run.seed_noise(summary, "d")  # pooled over the two 2-seed points
    np.testing.assert_allclose(noise, np.sqrt((0.1 ** 2 * 2 + 0.2 ** 2 * 2) / 2))
    table = run.markdown(summary)
    self.assertIn(f"| d | 8 -> 4 | -0.4000 | {noise:.4f} | {-0.4 / noise:+.1f} |", table)
    self.assertIn("| d | 1 | 1024 | 1 | 1.0000 |", table)

  def test_real_sweep_smoke(self):
    if not os.path.isdir(FASHION_MNIST):
      self.skipTest(f"needs Fashion-MNIST at {os.path.abspath(FASHION_MNIST)} (absent)")
    out, report = self.create_tempdir().full_path, self.create_tempdir().full_path
    plan = run.plan(["fashion_mnist"], ["8", "4"], ["0", "1"], [])
    data = [f"config.input.data_dir={FASHION_MNIST}"]
    run.run_all(plan, out, "smoke", data)
    table = run.report(out, plan, report)
    self.assertTrue(os.path.getsize(os.path.join(report, "patch_scaling.png")) > 1000)
    with open(os.path.join(report, "results.json")) as f:
      rows = json.load(f)["runs"]
    self.assertLen(rows, 4)
    for r in rows:
      metrics = run.final_eval(run.read_records(
          run.workdir(out, r["dataset"], r["patch"], r["seed"])))
      self.assertEqual((r["step"], r["test_loss"]), (4, metrics["eval/test/loss"]))
    self.assertIn("| fashion_mnist | 8 -> 4 |", table)
    # Finished runs are not trained again.
    metrics_file = os.path.join(run.workdir(out, "fashion_mnist", 8, 0), "metrics.jsonl")
    before = os.path.getmtime(metrics_file)
    run.run_all(plan, out, "smoke", data)
    self.assertEqual(os.path.getmtime(metrics_file), before)


if __name__ == "__main__":
  absltest.main()
