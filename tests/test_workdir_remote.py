"""A gs:// workdir: the run writes metrics, config.json, TensorBoard events and Orbax
checkpoints to the bucket (no local `gs:` folder), resumes from it exactly, and moves a
corrupt checkpoint aside there.

The bucket is tests/fake_gcs.py, a local server of the GCS JSON API. The clients are
the real ones, reached through their emulator variables: gcsfs (etils.epath's gs://
backend), TensorStore's gcs driver (Orbax's arrays) and google-cloud-storage (Orbax's
bucket lookup, tensorboardX's uploads). What it cannot show: GCS's own latency,
consistency and auth, and hierarchical-namespace buckets (Orbax then uses another API).
"""
import json
import os
from unittest import mock

from absl.testing import absltest

from big_vision_like.registry import ConfigError
from tests import fake_gcs, helpers

_GCS = None
_ENV = None


def setUpModule():  # one server for the module: clients cache their endpoint
  global _GCS, _ENV
  _GCS = fake_gcs.FakeGcs(["bkt"]).__enter__()
  _ENV = mock.patch.dict(os.environ, _GCS.environment())
  _ENV.start()


def tearDownModule():
  _ENV.stop()
  _GCS.__exit__(None, None, None)


def _metrics(name):
  return [json.loads(line) for line in _GCS.read("bkt", name).decode().splitlines()]


class RemoteRunTest(absltest.TestCase):

  def _run(self, workdir, steps):
    # A constant schedule: 4 steps then 2 more are the same run as 6 steps at once.
    proc = helpers.run_main(workdir, f"--config.total_steps={steps}",
                            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
                            f"--config.eval_every_steps={steps}", "--config.optim.schedule=constant",
                            "--config.optim.warmup_steps=0", "--config.optim.warmup_epochs=0",
                            env=_GCS.environment())
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(_GCS.errors, [])
    return proc

  def test_train_resume_and_recover_in_a_bucket(self):
    proc = self._run("gs://bkt/run", 4)
    self.assertIn("--workdir=gs://bkt/run is remote: there is no lock", proc.stderr)
    self.assertFalse(os.path.exists(os.path.join(helpers.REPO, "gs:")))
    names = _GCS.names("bkt", "run/")
    for name in ("run/.lock", "run/config.json", "run/metrics.jsonl",
                 "run/checkpoints/2/commit_success.txt", "run/checkpoints/4/commit_success.txt"):
      self.assertIn(name, names)
    self.assertTrue(any(n.startswith("run/checkpoints/4/state/") and "ocdbt" in n
                        for n in names), names)
    self.assertTrue(any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names))
    self.assertTrue(any(a.startswith("tensorstore/") for a in _GCS.user_agents))
    self.assertEqual(json.loads(_GCS.read("bkt", "run/config.json"))["total_steps"], 4)
    self.assertEqual([r["step"] for r in _metrics("run/metrics.jsonl")], [1, 2, 3, 4, 4])

    proc = self._run("gs://bkt/run", 6)  # resumes from gs://bkt/run/checkpoints/4
    self.assertRegex(proc.stderr, r"Resumed from gs://bkt/run/checkpoints/4 at step 4")
    records = _metrics("run/metrics.jsonl")
    self.assertEqual([r["step"] for r in records if "train/loss" in r], [1, 2, 3, 4, 5, 6])
    local = self.create_tempdir().full_path  # the same run, uninterrupted, on local disk
    self._run(local, 6)
    self.assertEqual({r["step"]: r["train/loss"] for r in records if "train/loss" in r},
                     helpers.train_losses(local))

    for name in _GCS.names("bkt", "run/checkpoints/6/state/"):  # flip the newest's arrays
      if "/d/" in name:
        data, generation = _GCS.objects[("bkt", name)]
        _GCS.objects[("bkt", name)] = (bytes(b ^ 0xFF for b in data), generation)
    proc = self._run("gs://bkt/run", 6)
    self.assertRegex(proc.stderr, r"Checkpoint gs://bkt/run/checkpoints/6 is corrupt")
    self.assertRegex(proc.stderr, r"Resumed from gs://bkt/run/checkpoints/4 at step 4")
    self.assertTrue(_GCS.names("bkt", "run/checkpoints/6.corrupt/"))
    self.assertIn("run/checkpoints/6/commit_success.txt", _GCS.names("bkt", "run/"))


class RemoteFilesTest(absltest.TestCase):
  """The pieces in this process, on the same bucket."""

  def test_metrics_history_is_kept_and_cut_at_the_resumed_step(self):
    from big_vision_like import metrics  # pylint: disable=g-import-not-at-top
    # No TensorBoard here: its GCS writer uploads again when garbage-collected, after
    # this module's server is gone (the command's runs above check its events).
    self.enter_context(mock.patch.object(metrics, "_summary_writer", return_value=None))
    writer = metrics.MetricWriter("gs://bkt/metrics", 0)
    for step in range(1, 6):
      writer.write(step, {"train/loss": 1.0 / step})
    writer.close()
    self.assertEqual([r["step"] for r in _metrics("metrics/metrics.jsonl")], [1, 2, 3, 4, 5])
    writer = metrics.MetricWriter("gs://bkt/metrics", 3)  # a resume from step 3
    self.assertEqual([r["step"] for r in _metrics("metrics/metrics.jsonl")], [1, 2, 3])
    writer.write(4, {"train/loss": 0.2})  # appended: gcsfs's "a" mode would overwrite
    writer.close()
    self.assertEqual([r["step"] for r in _metrics("metrics/metrics.jsonl")], [1, 2, 3, 4])

  def test_a_missing_bucket_is_one_line_at_start(self):
    from big_vision_like.workdir import WorkdirLock  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(ConfigError, r"^--workdir=gs://no-such-bucket/run is not "
                                r"writable: .*\(gs://no-such-bucket/run/\.lock\)$"):
      WorkdirLock("gs://no-such-bucket/run")
    self.assertNotIn("no-such-bucket", _GCS.buckets)  # and none was created


if __name__ == "__main__":
  absltest.main()
