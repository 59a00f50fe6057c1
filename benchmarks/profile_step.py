"""Where the trainer step's time goes, by XLA operation kind (a profiler table).

  python -m benchmarks.profile_step                    # the 32x32 ViT of train_throughput
  python -m benchmarks.profile_step --models=vit_ti16 --top=30

Runs the real `Trainer.train_step` (the settings of benchmarks/train_throughput.py)
under `jax.profiler.trace` for --steps steps after a warm-up, reads the Perfetto
trace JSON it writes, and sums the device-side op durations by kind (the op
name without its numeric suffix: `ynn_fusion.240` -> `ynn_fusion`), per step
and as a share of the op time. Host-side and runtime events are left out.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
from absl import app, flags

from benchmarks import train_throughput

_TOP = flags.DEFINE_integer("top", 20, "Op kinds to print.")
_RUNTIME_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "ParseArguments",
                   "CommonPjRtLoadedExecutable")


def op_times(name: str, steps: int) -> collections.Counter:
  """Microseconds per op kind over `steps` traced steps."""
  with train_throughput.prepared(name) as (trainer, state, device_batch), \
      tempfile.TemporaryDirectory() as trace_dir:
    for _ in range(3):  # compile and warm up outside the trace
      state, metrics = trainer.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = trainer.train_step(state, device_batch)
      jax.block_until_ready(metrics)
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and not event["name"].startswith(_RUNTIME_EVENTS):
      times[re.sub(r"\.\d+$", "", event["name"])] += event.get("dur", 0)
  return times


def main(argv):
  del argv
  steps = train_throughput.flags.FLAGS.steps
  for name in train_throughput.flags.FLAGS.models:
    times = op_times(name, steps)
    total = sum(times.values())
    print(f"\n{name}: {total / steps / 1e3:.1f} ms of ops per step ({steps} traced steps, "
          f"{jax.devices()[0].device_kind}, compute dtype {train_throughput.flags.FLAGS.dtype})")
    print("| op kind | ms / step | share |")
    print("|---|---|---|")
    for kind, us in times.most_common(_TOP.value):
      print(f"| {kind} | {us / steps / 1e3:.1f} | {100 * us / total:.1f}% |")


if __name__ == "__main__":
  app.run(main)
