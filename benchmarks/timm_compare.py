"""Our trainer step against timm's, side by side, alternating, on this CPU.

  bash ../shared/tools/timm_reference_venv.sh /tmp/timm-ref    # throwaway torch + timm
  python -m benchmarks.timm_compare --timm_python=/tmp/timm-ref/bin/python \
      --models=vit_ti16,vit32,swin_t,perceiver32 --rounds=3 --steps=6 --warmup=2

Each round times every setting once in timm (PyTorch eager, float32, 2 threads,
AdamW lr 1e-3 wd 0.05, cross-entropy: `../shared/tools/timm_bench.py` for the
ViTs, the same recipe inline for Swin-T) and once in ours
(`benchmarks.train_throughput`, the step `main` runs), each in a fresh process,
alternating which goes first, and once more in ours under tcmalloc when it is
installed (`big_vision_like/cpu_allocator.py` says why). The machine's speed
drifts by up to 2x between quiet and busy periods, so only ratios taken within
a round mean much: the table prints the median over rounds of each ratio.
torch and timm never become project dependencies.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks import train_throughput
from big_vision_like import cpu_allocator

_TIMM_PYTHON = flags.DEFINE_string("timm_python", "/tmp/timm-ref/bin/python",
                                   "python of a venv with torch and timm.")
_TIMM_BENCH = flags.DEFINE_string(
    "timm_bench", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools",
                               "timm_bench.py"),
    "The shared timm throughput script (timm's own settings).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
# --models, --steps, --warmup: train_throughput's flags, passed on to both sides.
_MODELS, _STEPS, _WARMUP = (train_throughput._MODELS, train_throughput._STEPS,
                            train_throughput._WARMUP)

# Our setting -> timm_bench.py job name, or None for the inline Swin-T recipe.
TIMM_NAMES = {"vit_ti16": "vit_tiny_patch16_224", "vit32": "tiny_vit_32",
              "swin_t": "swin_tiny_patch4_window7_224"}

# timm_bench.py's train_bench recipe for a timm model it doesn't list.
_TIMM_INLINE = """
import json, statistics, sys, time, timm, torch
torch.set_num_threads(2); torch.set_num_interop_threads(1); torch.manual_seed(0)
name, batch, size, classes, warmup, steps = sys.argv[1], *map(int, sys.argv[2:])
model = timm.create_model(name, pretrained=False, num_classes=classes).train()
x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0.05)
loss_fn = torch.nn.CrossEntropyLoss()
def step():
  opt.zero_grad(set_to_none=True); loss_fn(model(x), y).backward(); opt.step()
for _ in range(warmup): step()
times = []
for _ in range(steps):
  t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times)}))
"""


def _run(cmd: list[str], env: dict | None = None) -> str:
  done = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{done.stderr[-2000:]}")
  return done.stdout


def timm_ms(setting: str) -> float | None:
  name = TIMM_NAMES.get(setting)
  if name is None:
    return None
  if name == "swin_tiny_patch4_window7_224":
    out = _run([_TIMM_PYTHON.value, "-c", _TIMM_INLINE, name, "32", "224", "1000",
                str(_WARMUP.value), str(_STEPS.value)])
  else:
    with tempfile.TemporaryDirectory() as tmp:
      out = _run([_TIMM_PYTHON.value, _TIMM_BENCH.value, "--only", name, "--steps",
                  str(_STEPS.value), "--warmup", str(_WARMUP.value), "--out",
                  os.path.join(tmp, "r.json")])
  rows = [json.loads(l) for l in out.splitlines() if l.startswith("{") and "median_s" in l]
  return 1e3 * rows[-1]["median_s"]


def ours_ms(setting: str, preload: str | None = None) -> float:
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  if preload:
    env["LD_PRELOAD"] = preload
  out = _run([sys.executable, "-m", "benchmarks.train_throughput", f"--models={setting}",
              f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}", "--json"], env)
  row = [json.loads(l) for l in out.splitlines() if l.startswith("{")][-1]
  if preload and row["malloc"] == "system":
    raise RuntimeError(f"LD_PRELOAD={preload} did not replace malloc")
  return row["step_ms"]


def main(argv):
  del argv
  if not os.path.exists(_TIMM_PYTHON.value) or not os.path.exists(_TIMM_BENCH.value):
    sys.exit(f"--timm_python={_TIMM_PYTHON.value} or --timm_bench={_TIMM_BENCH.value} "
             "does not exist; build the venv with ../shared/tools/timm_reference_venv.sh")
  tcmalloc = cpu_allocator.installed()
  times: dict[tuple[str, str], list[float]] = {}
  for r in range(_ROUNDS.value):
    for setting in _MODELS.value:
      runs = [("timm", lambda: timm_ms(setting)), ("ours", lambda: ours_ms(setting))]
      if r % 2:
        runs.reverse()
      if tcmalloc:
        runs.append(("ours+tcmalloc", lambda: ours_ms(setting, tcmalloc)))
      for who, fn in runs:
        ms = fn()
        if ms is not None:
          times.setdefault((setting, who), []).append(ms)
          print(f"round {r + 1} {setting} {who}: {ms:.0f} ms/step", flush=True)

  print(f"\nmedian over {_ROUNDS.value} alternating rounds of {_STEPS.value} timed steps; "
        f"speed = timm step time / ours in the same round; tcmalloc: {tcmalloc or 'not installed'}")
  print("| setting | batch | timm ms | ours ms | ours img/s | speed vs timm | "
        "ours+tcmalloc ms | speed vs timm |")
  print("|---|---|---|---|---|---|---|---|")
  for setting in _MODELS.value:
    batch = train_throughput.SETTINGS[setting][3]
    ours = statistics.median(times[(setting, "ours")])
    print(f"| {setting} | {batch} | {_median(times, setting, 'timm')} | "
          f"{_median(times, setting, 'ours')} | {batch / ours * 1e3:.1f} | "
          f"{_speed(times, setting, 'ours')} | {_median(times, setting, 'ours+tcmalloc')} | "
          f"{_speed(times, setting, 'ours+tcmalloc')} |")


def _median(times, setting, who) -> str:
  runs = times.get((setting, who))
  return f"{statistics.median(runs):.0f}" if runs else "-"


def _speed(times, setting, who) -> str:
  """Median over rounds of timm's time / ours in the same round (> 1: we are faster)."""
  pairs = zip(times.get((setting, "timm"), []), times.get((setting, who), []))
  ratios = [timm / ours for timm, ours in pairs]
  return f"{statistics.median(ratios):.2f}x" if ratios else "-"


if __name__ == "__main__":
  app.run(main)
