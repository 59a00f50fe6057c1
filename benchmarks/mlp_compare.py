"""The smallest program with the CPU gap to PyTorch: an MLP stack, forward + backward.

  python -m benchmarks.mlp_compare --timm_python=/tmp/timm-ref/bin/python --rounds=6

A residual stack of `depth` blocks x + tanh(x W) V on [tokens, width] (ViT-Ti/16's
6304 x 192 -> 768 -> 192 by default) and the gradient of sum(x^2) with respect to
x and every weight: only dense products and a little elementwise work, the part
of the ViT step where we lose to PyTorch (README "CPU speed"). Each round runs
PyTorch (2 threads, eager) and XLA (jit, tcmalloc when installed) in fresh
processes, alternating which goes first; each side reports the better of two
medians of --repeats runs. The table gives the per-round ratio and its median.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app, flags

from benchmarks import timm_compare
from big_vision_like import cpu_allocator

_ROUNDS = timm_compare._ROUNDS  # --rounds
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per median.")
_SHAPE = flags.DEFINE_list("shape", ["6304", "192", "768", "6"], "tokens, width, hidden, depth.")

_COMMON = """
import json, statistics, sys, time
import numpy as np
tokens, width, hidden, depth, repeats = map(int, sys.argv[1:])
rng = np.random.default_rng(0)
x0 = rng.standard_normal((tokens, width), dtype=np.float32)
w0 = [rng.standard_normal((width, hidden), dtype=np.float32) * 0.05 for _ in range(depth)]
v0 = [rng.standard_normal((hidden, width), dtype=np.float32) * 0.05 for _ in range(depth)]
def best_median(run):
  run()
  medians = []
  for _ in range(2):
    times = []
    for _ in range(repeats):
      t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    medians.append(statistics.median(times))
  print(json.dumps({"median_s": min(medians)}))
"""

_TORCH = _COMMON + """
import torch
torch.set_num_threads(2); torch.set_num_interop_threads(1)
x = torch.from_numpy(x0).requires_grad_()
ws = [torch.from_numpy(w).requires_grad_() for w in w0]
vs = [torch.from_numpy(v).requires_grad_() for v in v0]
def run():
  h = x
  for w, v in zip(ws, vs):
    h = h + torch.tanh(h @ w) @ v
  return torch.autograd.grad((h * h).sum(), [x] + ws + vs)
best_median(run)
"""

_JAX = _COMMON + """
import jax, jax.numpy as jnp
def loss(x, ws, vs):
  for w, v in zip(ws, vs):
    x = x + jnp.tanh(x @ w) @ v
  return jnp.sum(x * x)
grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
args = (jnp.asarray(x0), [jnp.asarray(w) for w in w0], [jnp.asarray(v) for v in v0])
best_median(lambda: jax.block_until_ready(grad(*args)))
"""


def _ms(cmd: list[str], env: dict | None = None) -> float:
  out = timm_compare._run(cmd + [*_SHAPE.value, str(_REPEATS.value)], env)
  return 1e3 * [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]["median_s"]


def main(argv):
  del argv
  torch_python = timm_compare._TIMM_PYTHON.value
  if not os.path.exists(torch_python):
    sys.exit(f"--timm_python={torch_python} does not exist; build the venv with "
             "../shared/tools/timm_reference_venv.sh")
  try:
    tokens, width, hidden, depth = map(int, _SHAPE.value)
  except ValueError:
    sys.exit(f"--shape={','.join(_SHAPE.value)}: want four integers, tokens,width,hidden,depth")
  gflop = 3 * depth * 2 * (2 * tokens * width * hidden) / 1e9  # forward + 2 backward products
  tcmalloc = cpu_allocator.installed(("tcmalloc",))
  env = dict(os.environ, **({"LD_PRELOAD": tcmalloc} if tcmalloc else {}))
  rows = []
  for r in range(_ROUNDS.value):
    runs = [("torch", lambda: _ms([torch_python, "-c", _TORCH])),
            ("xla", lambda: _ms([sys.executable, "-c", _JAX], env))]
    if r % 2:
      runs.reverse()
    times = {who: fn() for who, fn in runs}
    rows.append(times)
    print(f"round {r + 1}: torch {times['torch']:.0f} ms, xla {times['xla']:.0f} ms", flush=True)
  print(f"\nMLP {tokens} x {width} -> {hidden} -> {width}, depth {depth}, forward + backward "
        f"({gflop:.1f} GFLOP); xla under {tcmalloc or 'glibc malloc'}")
  print("| round | torch ms | xla ms | torch GFLOP/s | xla GFLOP/s | torch / xla time |")
  print("|---|---|---|---|---|---|")
  for r, t in enumerate(rows, 1):
    print(f"| {r} | {t['torch']:.0f} | {t['xla']:.0f} | {gflop / t['torch'] * 1e3:.0f} | "
          f"{gflop / t['xla'] * 1e3:.0f} | {t['torch'] / t['xla']:.2f}x |")
  ratios = [t["torch"] / t["xla"] for t in rows]
  print(f"median torch / xla time: {statistics.median(ratios):.2f}x (> 1: XLA faster)")


if __name__ == "__main__":
  app.run(main)
