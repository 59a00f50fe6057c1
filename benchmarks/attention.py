"""Attention kernels: time and TFLOP/s per implementation; ViT-B/16 training MFU.

  python -m benchmarks.attention                          # this platform's defaults
  python -m benchmarks.attention --lengths=1024,4096 --head_dims=64 --skip_vit

For each sequence length and head dim (bf16, batch x length = --tokens, heads =
--hidden / head dim, as in the FlashAttention papers' benchmarks) it times the
forward and forward+backward of every implementation available here (median
of --repeats after a warm-up) and prints TFLOP/s, counting 4 * B * H * L^2 * D
for the forward and 2.5x that for the backward, with each implementation's
time as a ratio to the reference in the same run ('cudnn' on GPU, 'xla'
elsewhere). A run that does not fit in memory prints 'OOM'.

Then the real trainer step for ViT-B/16 at 224x224 (bf16 activations, AdamW)
gives images/s and model-FLOPs utilisation: XLA's FLOP count of the step over
the time, against the bf16 dense peak of the GPU (H100 / H200: 989 TFLOP/s) or,
on a CPU, against a bf16 matmul measured in the same run.

On a CPU the Pallas kernel is interpreted (a correctness tool, orders of
magnitude slower), so it is not timed there.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import train_throughput
from big_vision_like import ops
from big_vision_like.ops import attention as attention_lib

GPU = jax.default_backend() == "gpu"
_LENGTHS = flags.DEFINE_list(
    "lengths", ["1024", "2048", "4096", "8192", "16384", "50176"] if GPU
    else ["1024", "2048", "4096"], "Sequence lengths (50,176 = 224x224 pixels).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_TOKENS = flags.DEFINE_integer("tokens", 16384 if GPU else 4096,
                               "batch x length (batch at least 1).")
_HIDDEN = flags.DEFINE_integer("hidden", 2048 if GPU else 256, "heads x head dim.")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", ["cudnn", "pallas", "chunked", "xla"] if GPU else ["xla", "chunked"],
    "Implementations to time; the first is the reference of the ratios.")
_REPEATS = flags.DEFINE_integer("repeats", 10 if GPU else 3, "Timed runs (median).")
_VIT_BATCH = flags.DEFINE_integer("vit_batch", 256 if GPU else 8, "ViT-B/16 batch.")
_SKIP_VIT = flags.DEFINE_bool("skip_vit", False, "Only the kernels.")

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def timed(f, *args) -> float:
  jax.block_until_ready(f(*args))  # compile + warm up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def kernel_times(implementation: str, length: int, head_dim: int) -> tuple[float, float]:
  """(forward s, forward+backward s), or NaNs if it does not fit."""
  batch, heads = max(1, _TOKENS.value // length), max(1, _HIDDEN.value // head_dim)
  shape = (batch, length, heads, head_dim)
  q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
  attend = functools.partial(ops.dot_product_attention, implementation=implementation)
  forward = jax.jit(attend)
  backward = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(),
                              argnums=(0, 1, 2)))
  try:
    return timed(forward, q, k, v), timed(backward, q, k, v)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
      return float("nan"), float("nan")
    raise


def peak_tflops() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name in kind:
      return peak, f"{name} bf16 dense peak"
  return (train_throughput.matmul_gflops(dtype=jnp.bfloat16) / 1e3,
          "bf16 matmul 2048^3 measured now")


def main(argv):
  del argv
  platform = jax.default_backend()
  available = [i for i in _IMPLEMENTATIONS.value if platform in attention_lib.PLATFORMS[i]
               and not (i == "pallas" and platform != "gpu")]
  print(f"device: {jax.devices()[0].device_kind} ({platform}); bf16; batch x length = "
        f"{_TOKENS.value}, heads x head dim = {_HIDDEN.value}; median of {_REPEATS.value}")
  print("| length | head dim | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
        f"fwd+bwd TFLOP/s | time vs {available[0]} (fwd / fwd+bwd) |")
  print("|---|---|---|---|---|---|---|---|")
  for length in (int(x) for x in _LENGTHS.value):
    for head_dim in (int(x) for x in _HEAD_DIMS.value):
      batch, heads = max(1, _TOKENS.value // length), max(1, _HIDDEN.value // head_dim)
      flops = 4 * batch * heads * length ** 2 * head_dim
      reference = None
      for implementation in available:
        fwd, both = kernel_times(implementation, length, head_dim)
        reference = reference or (fwd, both)
        ratio = f"{fwd / reference[0]:.2f}x / {both / reference[1]:.2f}x"
        cell = lambda s, f: ("OOM", "-") if np.isnan(s) else (f"{s * 1e3:.2f}",
                                                              f"{f / s / 1e12:.3f}")
        print(f"| {length:,} | {head_dim} | {implementation} | "
              f"{' | '.join(cell(fwd, flops))} | {' | '.join(cell(both, 3.5 * flops))} | "
              f"{ratio} |", flush=True)
  if _SKIP_VIT.value:
    return
  train_throughput.flags.FLAGS.dtype = "bfloat16"
  peak, peak_source = peak_tflops()
  row = train_throughput.measure("vit_b16", _VIT_BATCH.value)
  tflops = row["gflop_s"] / 1e3
  print(f"\nViT-B/16 224x224 training step (the trainer's, AdamW, bf16 activations), "
        f"batch {row['batch']}: {row['step_ms']:.1f} ms, {row['img_s']:.1f} images/s, "
        f"{tflops:.3f} TFLOP/s = {100 * tflops / peak:.1f}% MFU of {peak:.3f} TFLOP/s "
        f"({peak_source})")


if __name__ == "__main__":
  app.run(main)
