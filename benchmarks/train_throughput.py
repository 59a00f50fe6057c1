"""Training-step throughput of the real trainer step, next to the machine's matmul rate.

  python -m benchmarks.train_throughput            # both settings of the issue
  python -m benchmarks.train_throughput --steps=20 --models=vit32

Times `Trainer.train_step` (the step `main` runs: AdamW lr 1e-3, wd 0.05,
clipping 1.0, softmax cross-entropy, float32) on a fixed device-resident batch,
so the input pipeline is not measured. Reports the median step time over
`--steps` steps after `--warmup` steps, images/s, and the achieved GFLOP/s
(XLA's cost analysis of the compiled step) against a float32 matmul measured
in the same run.
"""
from __future__ import annotations

import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from big_vision_like import configuration, cpu_allocator
from big_vision_like.ops import cpu_gemm
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.parallel import sharding
from big_vision_like.train import Trainer

_MODELS = flags.DEFINE_list("models", ["vit_ti16", "vit32"], "Settings to run.")
_STEPS = flags.DEFINE_integer("steps", 12, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
_JSON = flags.DEFINE_bool("json", False, "Also print each row as a JSON line (for scripts).")

SETTINGS = {
    # name: (model fields, image size, channels, batch); the timm settings of
    # ../shared/tools/timm_bench.py where timm has the model.
    "vit_ti16": (dict(variant="Ti/16", num_classes=1000, pool="cls"), 224, 3, 32),
    "vit32": (dict(patch_size=4, width=192, depth=6, num_heads=3, mlp_dim=768,
                   num_classes=10, pool="cls"), 32, 3, 128),
    "vit_b16": (dict(variant="B/16", num_classes=1000, pool="cls"), 224, 3, 256),
    "swin_t": (dict(name="swin", variant="T", num_classes=1000, drop_path=0.0), 224, 3, 32),
    # configs/perceiver_cifar10.py's classifier, float32, at vit32's batch.
    "perceiver32": (dict(name="perceiver", num_classes=10, preprocessor="pixels",
                         posemb="fourier", num_bands=32, num_latents=128, latent_dim=256,
                         num_blocks=2, self_attends_per_block=4, self_heads=8,
                         cross_heads=1, decoder="class"), 32, 3, 128),
}


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / np.median(times) / 1e9


def config_for(name: str, batch: int | None = None, optim: dict | None = None):
  model, size, channels, default_batch = SETTINGS[name]
  batch = batch or default_batch
  config = configuration.defaults()
  config.total_steps = 10_000
  config.input.batch_size = batch
  config.model = dict(name="vit", image_size=size, channels=channels, dtype=_DTYPE.value)
  config.model.update(model)
  config.objective = dict(name="supervised")
  config.optim.update(lr=1e-3, weight_decay=0.05, warmup_steps=0, **(optim or {}))
  return config, size, channels, batch


@contextlib.contextmanager
def prepared(name: str, batch: int | None = None, optim: dict | None = None, **model):
  """(trainer, initial state, device-resident random batch) of a setting, inside
  its mesh. `model` overrides config.model fields (attention, remat, ...), `optim`
  config.optim's (frozen, ...)."""
  config, size, channels, batch = config_for(name, batch, optim)
  config.model.update(model)
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32),
              "label": rng.integers(0, config.model.num_classes, batch).astype(np.int32)}
  with jax.set_mesh(mesh):
    trainer = Trainer(config, mesh, steps_per_epoch=1000)
    yield trainer, trainer.init_state(), sharding.put_batch(batch_np, mesh)


def step_flops(name: str, batch: int | None = None, optim: dict | None = None,
               **model) -> float:
  """FLOPs of one training step by XLA's cost analysis, of a trainer traced with
  XLA's own dots (the analysis cannot see inside ops.cpu_gemm's custom call)."""
  with cpu_gemm.disabled(), prepared(name, batch, optim, **model) as (trainer, state,
                                                                     device_batch):
    cost = trainer.train_step.lower(state, device_batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def measure(name: str, batch: int | None = None, optim: dict | None = None, **model) -> dict:
  flops = step_flops(name, batch, optim, **model)
  with prepared(name, batch, optim, **model) as (trainer, state, device_batch):
    batch = device_batch["label"].shape[0]
    for _ in range(_WARMUP.value):
      state, metrics = trainer.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, metrics = trainer.train_step(state, device_batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
  step = float(np.median(times))
  return {"name": name, "batch": batch, "step_ms": step * 1e3, "img_s": batch / step,
          "gflop_step": flops / 1e9, "gflop_s": flops / step / 1e9}


def main(argv):
  del argv
  peak_before = matmul_gflops()
  rows = [measure(name) for name in _MODELS.value]
  peak_after = matmul_gflops()
  peak = (peak_before + peak_after) / 2
  print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"compute dtype {_DTYPE.value}, median of {_STEPS.value} steps, "
        f"malloc: {cpu_allocator.active()}")
  print(f"float32 matmul 2048^3: {peak_before:.1f} GFLOP/s before, "
        f"{peak_after:.1f} after")
  print("| setting | batch | step (ms) | images/s | GFLOP/step | GFLOP/s | % of matmul |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['batch']} | {r['step_ms']:.1f} | {r['img_s']:.1f} | "
          f"{r['gflop_step']:.1f} | {r['gflop_s']:.1f} | {100 * r['gflop_s'] / peak:.0f}% |")
  if _JSON.value:
    for r in rows:
      print(json.dumps(dict(r, matmul_gflop_s=peak, malloc=cpu_allocator.active())))


if __name__ == "__main__":
  app.run(main)
