"""Evaluates a config's model at step 0 (untrained weights): the baseline a
pre-training run has to beat (random ViT features already reach ~30% kNN on
CIFAR-10).

  python benchmarks/untrained_baseline.py configs/dino_cifar10.py knn
  python benchmarks/untrained_baseline.py configs/clip_cifar10.py knn,zeroshot,coco

The second argument picks evaluators of `config.evals` by name (all if omitted).
"""
import importlib.util
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_vision_like import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from big_vision_like.parallel import mesh as mesh_lib  # pylint: disable=wrong-import-position


def main(argv):
  path, _, arg = argv[1].partition(":")
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if len(argv) > 2:
    keep = argv[2].split(",")
    config.evals = {k: v for k, v in config.evals.items() if k in keep}
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  with jax.set_mesh(mesh):
    trainer = train.Trainer(config, mesh, steps_per_epoch=1)
    state = trainer.init_state()
    for name, (evaluator, _) in train.build_evaluators(config, mesh).items():
      results = evaluator.run(trainer.graphdef, trainer.eval_state(state))
      print(f"{argv[1]} step 0 {name}: " +
            ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
  main(sys.argv)
