"""Train and evaluate: python -m main --config=configs/default.py --workdir=/tmp/run

Any config field can be overridden, e.g. --config.total_steps=100. Running the
same command again resumes from the newest checkpoint in the workdir.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config override is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises AttributeError/KeyError for typos
    message = " ".join(str(e).replace("\\n", " ").strip("'\"").split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries:
  """Hides Orbax's and grain's INFO chatter so the console shows training progress."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= 30 or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from big_vision_like import train  # pylint: disable=g-import-not-at-top
  from big_vision_like.registry import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value
    metrics = train.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for key, value in sorted(metrics.items()):
    print(f"final {key} = {value:.4f}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
