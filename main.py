"""Train and evaluate: python -m main --config=configs/default.py --workdir=/tmp/run

The repository's command (run from its root). The logic lives in
big_vision_like/cli.py, so an installed package runs the same thing from any
directory as `python -m big_vision_like --config=default --workdir=/tmp/run` or
`bvl-train ...`. Any config field can be overridden, e.g. --config.total_steps=100;
running the same command again resumes from the newest checkpoint in the workdir.
The cli module's docstring has the rest (bundled config names, tcmalloc restart,
multi-process flags).
"""
from big_vision_like.cli import PREEMPTED_EARLY, _quiet_closed_loops, main  # noqa: F401

if __name__ == "__main__":  # not in grain's spawned workers, which import this module
  main()
