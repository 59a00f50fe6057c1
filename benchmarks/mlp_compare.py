"""The smallest program with the CPU gap to PyTorch: an MLP stack, forward + backward.

  python -m benchmarks.mlp_compare --timm_python=/tmp/timm-ref/bin/python --rounds=6
  python -m benchmarks.mlp_compare --timm_python=/tmp/timm-ref/bin/python --products

A residual stack of `depth` blocks x + tanh(x W) V on [tokens, width] (ViT-Ti/16's
6304 x 192 -> 768 -> 192 by default) and the gradient of sum(x^2) with respect to
x and every weight: only dense products and a little elementwise work, the part
of the ViT step where we lose to PyTorch (README "CPU speed"). Each round runs
PyTorch (2 threads, eager) and XLA (jit, tcmalloc when installed) in fresh
processes, alternating which goes first; each side reports the better of two
medians of --repeats runs. The table gives the per-round ratio and its median.
--products times each of the step's dense products alone instead (forward, input
gradient, weight gradient; [tokens, width] x [width, hidden] and the square
[width, width] of q / k / v), each side in one process per round.
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
_PRODUCTS = flags.DEFINE_bool("products", False, "Time each dense product alone instead.")

_COMMON = """
import json, statistics, sys, time
import numpy as np
tokens, width, hidden, depth, repeats = map(int, sys.argv[1:])
rng = np.random.default_rng(0)
x0 = rng.standard_normal((tokens, width), dtype=np.float32)
w0 = [rng.standard_normal((width, hidden), dtype=np.float32) * 0.05 for _ in range(depth)]
v0 = [rng.standard_normal((hidden, width), dtype=np.float32) * 0.05 for _ in range(depth)]
def best_median_s(run):  # the better of two medians of `repeats` runs, after one untimed
  run()
  def once():
    t = time.perf_counter(); run(); return time.perf_counter() - t
  return min(statistics.median(once() for _ in range(repeats)) for _ in range(2))
def best_median(run):
  print(json.dumps({"median_s": best_median_s(run)}))
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


# Each product alone: (name, lhs shape, rhs shape, lhs / rhs contracting dim);
# T tokens, C width, H hidden. The weight gradients contract over the tokens.
_PRODUCTS_COMMON = _COMMON + """
T, C, H = tokens, width, hidden
PRODUCTS = [("forward x W1", (T, C), (C, H), 1, 0), ("forward h W2", (T, H), (H, C), 1, 0),
            ("forward x Wq", (T, C), (C, C), 1, 0),
            ("input grad g W1^T", (T, H), (C, H), 1, 1), ("input grad g W2^T", (T, C), (H, C), 1, 1),
            ("input grad g Wq^T", (T, C), (C, C), 1, 1),
            ("weight grad x^T g (W1)", (T, C), (T, H), 0, 0),
            ("weight grad h^T g (W2)", (T, H), (T, C), 0, 0),
            ("weight grad x^T g (Wq)", (T, C), (T, C), 0, 0)]
def each_product(make_run):
  out = {}
  for name, ls, rs, lc, rc in PRODUCTS:
    a = rng.standard_normal(ls, dtype=np.float32); b = rng.standard_normal(rs, dtype=np.float32)
    out[name] = [best_median_s(make_run(a, b, lc, rc)), ls[1 - lc], ls[lc], rs[1 - rc]]  # m, k, n
  print(json.dumps(out))
"""

_TORCH_PRODUCTS = _PRODUCTS_COMMON + """
import torch
torch.set_num_threads(2); torch.set_num_interop_threads(1)
def make_run(a, b, lc, rc):
  a, b = torch.from_numpy(a), torch.from_numpy(b)
  a, b = (a if lc == 1 else a.t()), (b if rc == 0 else b.t())  # views: BLAS transposes
  return lambda: torch.mm(a, b)
each_product(make_run)
"""

_JAX_PRODUCTS = _PRODUCTS_COMMON + """
import jax, jax.numpy as jnp
def make_run(a, b, lc, rc):
  dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((lc,), (rc,)), ((), ()))))
  a, b = jnp.asarray(a), jnp.asarray(b)
  return lambda: jax.block_until_ready(dot(a, b))
each_product(make_run)
"""


def _result(cmd: list[str], env: dict | None = None) -> dict:
  """The JSON line a program above prints, run with --shape and --repeats."""
  out = timm_compare._run(cmd + [*_SHAPE.value, str(_REPEATS.value)], env)
  return [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]


def _rounds(torch_python, torch_code, jax_code, env) -> list[dict]:
  """Per round, {"torch": result, "xla": result}, fresh processes, alternating
  which goes first; XLA's process gets `env` (tcmalloc)."""
  rows = []
  for r in range(_ROUNDS.value):
    runs = [("torch", [torch_python, "-c", torch_code], None),
            ("xla", [sys.executable, "-c", jax_code], env)]
    rows.append({who: _result(cmd, run_env)
                 for who, cmd, run_env in (runs if r % 2 == 0 else runs[::-1])})
    print(f"round {r + 1} done", flush=True)
  return rows


def _products(torch_python, env, shape):
  """Per-product GFLOP/s of each side; prints the table."""
  tokens, width, hidden, _ = shape
  rows = _rounds(torch_python, _TORCH_PRODUCTS, _JAX_PRODUCTS, env)
  print(f"\nEach product alone, {tokens} tokens, width {width}, hidden {hidden}; median over "
        f"{_ROUNDS.value} alternating rounds (xla under {env.get('LD_PRELOAD', 'glibc malloc')})")
  print("| product | m x k x n | torch GFLOP/s | xla GFLOP/s | xla / torch speed |")
  print("|---|---|---|---|---|")
  for name, (_, m, k, n) in rows[0]["torch"].items():
    rate = lambda who: statistics.median(2 * m * k * n / t[who][name][0] / 1e9 for t in rows)
    ratio = statistics.median(t["torch"][name][0] / t["xla"][name][0] for t in rows)
    print(f"| {name} | {m} x {k} x {n} | {rate('torch'):.0f} | {rate('xla'):.0f} | {ratio:.2f}x |")


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
  if _PRODUCTS.value:
    return _products(torch_python, env, (tokens, width, hidden, depth))
  rows = [{who: 1e3 * result["median_s"] for who, result in row.items()}
          for row in _rounds(torch_python, _TORCH, _JAX, env)]
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
