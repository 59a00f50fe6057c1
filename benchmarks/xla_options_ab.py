"""Does an XLA compiler option speed up the trainer step? An in-process A/B.

  python -m benchmarks.xla_options_ab --models=vit32 \
      --options=xla_cpu_experimental_ynn_fusion_type=
  python -m benchmarks.xla_options_ab --models=vit_ti16 --rounds=16 --control \
      --options=xla_cpu_enable_fast_math=true,xla_cpu_prefer_vector_width=512

This machine's speed drifts by up to 2x between busy and quiet periods (README
"CPU speed"), so one process run with XLA_FLAGS against another without mostly
measures the drift. Here one process compiles the real `Trainer.train_step`
(settings of benchmarks/train_throughput.py) twice, A as is and B with the
options (`Lowered.compile(compiler_options=...)`, the per-program form of
XLA_FLAGS), and alternates their steps, so both see the same machine. --control
adds A', a second compile of A: its ratio to A is the noise floor. An option
that helps goes into XLA_FLAGS for real runs.
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
from absl import app, flags

from benchmarks import train_throughput

_OPTIONS = flags.DEFINE_list(
    "options", [], "name=value XLA options for B; true / false are booleans, "
    "anything else is passed as text (XLA parses numbers and enums).")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Alternating rounds (one step of each per round).")
_CONTROL = flags.DEFINE_bool("control", False, "Also time A', a second compile of A.")
_A2 = "A'"  # the control's key


def parse_options(items: list[str]) -> dict:
  """--options entries as compiler_options; a one-line error for a bad entry."""
  options = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name.startswith("xla_"):
      raise ValueError(f"--options entry {item!r}: want xla_<name>=<value>")
    options[name] = {"true": True, "false": False}.get(value.lower(), value)
  return options


def compiled_steps(trainer, state, batch, options: dict, control: bool) -> dict:
  """Executables of the same step: 'A' default, 'B' with `options`, maybe "A'"."""
  lowered = trainer.train_step.lower(state, batch)
  steps = {"A": lowered.compile()}
  try:
    steps["B"] = lowered.compile(compiler_options=options)
  except Exception as e:  # XLA names the bad option: "No such compile option: 'x'"
    raise ValueError(f"--options: {str(e).splitlines()[0]}") from e
  if control:
    steps[_A2] = lowered.compile()
  return steps


def ab(name: str, options: dict) -> dict:
  """Median step seconds of each executable over alternating rounds."""
  with train_throughput.prepared(name) as (trainer, state, batch):
    steps = compiled_steps(trainer, state, batch, options, _CONTROL.value)
    same_hlo = steps["A"].as_text() == steps["B"].as_text()
    states = {key: trainer.init_state() for key in steps}  # each step donates its own
    times = {key: [] for key in steps}
    order = list(steps)
    for r in range(train_throughput._WARMUP.value + _ROUNDS.value):
      for key in (order if r % 2 == 0 else order[::-1]):
        start = time.perf_counter()
        states[key], metrics = steps[key](states[key], batch)
        jax.block_until_ready(metrics)
        if r >= train_throughput._WARMUP.value:
          times[key].append(time.perf_counter() - start)
  return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "same_hlo": same_hlo}


def main(argv):
  del argv
  try:
    options = parse_options(_OPTIONS.value)
  except ValueError as e:
    sys.exit(str(e))
  if not options:
    sys.exit("--options is empty: name the XLA options to try, e.g. "
             "--options=xla_cpu_experimental_ynn_fusion_type=")
  print(f"B: {options}; {_ROUNDS.value} rounds after {train_throughput._WARMUP.value} warm-up, "
        f"{jax.devices()[0].device_kind}")
  print("| setting | A ms | B ms | B speed-up | A' ms (control) | A / A' | optimized HLO |")
  print("|---|---|---|---|---|---|---|")
  for name in train_throughput._MODELS.value:
    try:
      result = ab(name, options)
    except ValueError as e:
      sys.exit(str(e))
    t = {k: 1e3 * v for k, v in result["median_s"].items()}
    control = f"{t[_A2]:.0f} | {t['A'] / t[_A2]:.2f}x" if _A2 in t else "- | -"
    print(f"| {name} | {t['A']:.0f} | {t['B']:.0f} | {t['A'] / t['B']:.2f}x | {control} | "
          f"{'same as A' if result['same_hlo'] else 'differs'} |", flush=True)


if __name__ == "__main__":
  app.run(main)
