"""XLA's CPU dots against ops.cpu_gemm (OpenBLAS) on the products of a small ViT's step.

  python -m benchmarks.cpu_gemm --repeats=15

For each product (the ViT-Ti/16 step's dense layers at batch 32, and the attention
products of ViT-Ti/16 and of the 32x32 ViT at batch 128) both jitted versions run
alternately, `repeats` times each, on the same inputs; the table gives the median
GFLOP/s of each and their ratio (> 1: OpenBLAS is faster). Whole-step effects
(fusions a custom call prevents, threads shared with other ops) are not in this
table: measure those with benchmarks/train_throughput.py.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from big_vision_like.ops import cpu_gemm

_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs of each version.")

PRODUCTS = [
    ("dense q/k/v/proj, ViT-Ti/16", "mk,kn->mn", (6304, 192), (192, 192)),
    ("dense MLP in", "mk,kn->mn", (6304, 192), (192, 768)),
    ("dense weight gradient", "mk,mn->kn", (6304, 192), (6304, 192)),
    ("attention q k^T, ViT-Ti/16", "bqhd,bkhd->bhqk", (32, 197, 3, 64), (32, 197, 3, 64)),
    ("attention weights v, ViT-Ti/16", "bhqk,bkhd->bqhd", (32, 3, 197, 197), (32, 197, 3, 64)),
    ("attention q k^T, 32x32 ViT", "bqhd,bkhd->bhqk", (128, 65, 3, 64), (128, 65, 3, 64)),
    ("attention weights v, 32x32 ViT", "bhqk,bkhd->bqhd", (128, 3, 65, 65), (128, 65, 3, 64)),
]


def flops(spec: str, x_shape, y_shape) -> float:
  sizes = dict(zip(spec.split(",")[0], x_shape)) | dict(
      zip(spec.split(",")[1].split("->")[0], y_shape))
  return 2.0 * np.prod(list(sizes.values()))


def main(argv):
  del argv
  if not cpu_gemm.available():
    raise SystemExit("ops.cpu_gemm is unavailable here (see the warning above)")
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}, median of {_REPEATS.value} alternating runs")
  print("| product | spec | XLA GFLOP/s | OpenBLAS GFLOP/s | OpenBLAS / XLA |")
  print("|---|---|---|---|---|")
  for name, spec, x_shape, y_shape in PRODUCTS:
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    y = jnp.asarray(rng.standard_normal(y_shape, dtype=np.float32))
    versions = {"xla": jax.jit(lambda a, b, s=spec: jnp.einsum(s, a, b)),
                "blas": jax.jit(lambda a, b, s=spec: cpu_gemm.einsum(s, a, b))}
    times = {k: [] for k in versions}
    for f in versions.values():
      f(x, y).block_until_ready()
    for _ in range(_REPEATS.value):
      for key, f in versions.items():
        start = time.perf_counter()
        f(x, y).block_until_ready()
        times[key].append(time.perf_counter() - start)
    rate = {k: flops(spec, x_shape, y_shape) / np.median(t) / 1e9 for k, t in times.items()}
    print(f"| {name} | `{spec}` {x_shape} x {y_shape} | {rate['xla']:.0f} | "
          f"{rate['blas']:.0f} | {rate['blas'] / rate['xla']:.2f}x |")


if __name__ == "__main__":
  app.run(main)
