"""`python -m big_vision_like --config=<name or file.py>[:arg] --workdir=DIR`: the
training command of an installed package, from any directory (see cli.py)."""
from big_vision_like.cli import main

if __name__ == "__main__":  # not in grain's spawned workers
  main()
