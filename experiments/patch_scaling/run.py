"""Runs the patch-size sweep, collects the test metrics and draws the plot.

  python experiments/patch_scaling/run.py --out=/tmp/patch_scaling

Each point is one `python -m main` run of `config.py` (its own workdir under
`--out`, so a killed sweep resumes where it stopped: finished runs are skipped,
an interrupted one continues from its last checkpoint). The cheap patch sizes
run first, every seed; patch 1 (1,024 tokens at 32x32) costs ~10x patch 2 on
a CPU and runs `--pixel_seeds` only. Then it writes, into `--report_dir`:
`results.json` (every run), `results.md` (mean +- std over seeds per point and
the effect of each halving against the seed noise) and `patch_scaling.png`
(log-log test loss against patch size). `--collect_only` redraws from the
workdirs without training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from big_vision_like import cpu_allocator  # pylint: disable=wrong-import-position

CONFIG = os.path.join("experiments", "patch_scaling", "config.py")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a script: the tests import this module next to other absl flags."""
  flags.DEFINE_string("out", "/tmp/patch_scaling", "Root of the runs' workdirs.")
  flags.DEFINE_string("report_dir", os.path.dirname(os.path.abspath(__file__)),
                      "Where results.json / results.md / patch_scaling.png go.")
  flags.DEFINE_list("datasets", ["cifar10", "fashion_mnist"], "Datasets.")
  flags.DEFINE_list("patches", ["8", "4", "2", "1"], "Patch sizes.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every patch size but 1.")
  flags.DEFINE_list("pixel_seeds", ["0"], "Seeds of patch size 1.")
  flags.DEFINE_enum("setting", "cpu", ["cpu", "gpu", "smoke"], "config.py's SETTINGS entry.")
  flags.DEFINE_multi_string(
      "override", [], "Extra --config.X=Y for every run, e.g. "
      "--override=config.input.data_dir=/data/cifar10_jpeg.tar.gz (repeatable).")
  flags.DEFINE_bool("collect_only", False, "Only collect and plot.")


def plan(datasets, patches, seeds, pixel_seeds) -> list[tuple[str, int, int]]:
  """(dataset, patch, seed) in the order to run them: cheapest patch sizes first."""
  runs = []
  for patch in sorted((int(p) for p in patches), reverse=True):
    for seed in (pixel_seeds if patch == 1 else seeds):
      for dataset in datasets:
        runs.append((dataset, patch, int(seed)))
  return runs


def workdir(out: str, dataset: str, patch: int, seed: int) -> str:
  return os.path.join(out, dataset, f"patch{patch}_seed{seed}")


def read_records(path: str) -> list[dict]:
  """A run's metrics.jsonl records; [] before its first log. A line cut short by a
  kill is ignored (the resumed run writes that step again)."""
  records = []
  try:
    with open(os.path.join(path, "metrics.jsonl")) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  except FileNotFoundError:
    pass
  return records


def final_eval(records: list[dict]) -> dict | None:
  """The last record with test metrics, or None if there is none yet."""
  evals = [r for r in records if "eval/test/loss" in r]
  return evals[-1] if evals else None


def finished_records(path: str) -> list[dict] | None:
  """The run's records if its last test evaluation is at its configured last step."""
  records = read_records(path)
  record = final_eval(records)
  config_path = os.path.join(path, "config.json")
  if record is None or not os.path.exists(config_path):
    return None
  with open(config_path) as f:
    total = json.load(f).get("total_steps")
  return records if total is not None and record["step"] >= total else None


def command(dataset: str, patch: int, seed: int, path: str, setting: str,
            overrides=()) -> list[str]:
  cmd = [sys.executable, "-m", "main", f"--config={CONFIG}:{dataset},{setting}",
         f"--workdir={path}", f"--config.model.patch_size={patch}", f"--config.seed={seed}"]
  return cmd + [f"--{o}" if not o.startswith("--") else o for o in overrides]


def run_all(runs, out, setting, overrides) -> None:
  env = dict(os.environ)
  malloc = cpu_allocator.installed()
  if malloc and "LD_PRELOAD" not in env and setting != "gpu":
    env["LD_PRELOAD"] = malloc  # 1.2-1.4x on CPU (README "CPU speed")
  for i, (dataset, patch, seed) in enumerate(runs):
    path = workdir(out, dataset, patch, seed)
    if finished_records(path) is not None:
      logging.info("[%d/%d] %s done, skipped", i + 1, len(runs), path)
      continue
    logging.info("[%d/%d] %s", i + 1, len(runs), path)
    subprocess.run(command(dataset, patch, seed, path, setting, overrides),
                   cwd=ROOT, env=env, check=True)


def collect(out: str, runs) -> list[dict]:
  """One row per finished run: dataset, patch, seed, test loss / accuracy, img/s."""
  rows = []
  for dataset, patch, seed in runs:
    records = finished_records(workdir(out, dataset, patch, seed))
    if records is None:
      continue
    record = final_eval(records)
    speeds = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    rows.append({"dataset": dataset, "patch": patch, "seed": seed, "step": record["step"],
                 "test_loss": record["eval/test/loss"],
                 "test_accuracy": record["eval/test/accuracy"],
                 "train_images_per_sec": float(np.median(speeds)) if speeds else None})
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and sample std over seeds per (dataset, patch), largest patch first."""
  groups: dict[tuple[str, int], list[dict]] = {}
  for r in rows:
    groups.setdefault((r["dataset"], r["patch"]), []).append(r)
  out = []
  for (dataset, patch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
    loss = np.array([r["test_loss"] for r in rs])
    acc = np.array([r["test_accuracy"] for r in rs])
    out.append({"dataset": dataset, "patch": patch, "seeds": len(rs),
                "loss_mean": float(loss.mean()),
                "loss_std": float(loss.std(ddof=1)) if len(rs) > 1 else None,
                "acc_mean": float(acc.mean()),
                "acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else None,
                "images_per_sec": float(np.median([r["train_images_per_sec"] for r in rs]))})
  return out


def seed_noise(summary: list[dict], dataset: str) -> float | None:
  """Pooled seed std of the test loss over the points of `dataset` with >1 seed."""
  var = [(s["seeds"] - 1, s["loss_std"] ** 2) for s in summary
         if s["dataset"] == dataset and s["loss_std"] is not None]
  dof = sum(d for d, _ in var)
  return float(np.sqrt(sum(d * v for d, v in var) / dof)) if dof else None


def markdown(summary: list[dict]) -> str:
  lines = ["| dataset | patch | tokens | seeds | test loss | test accuracy | train img/s |",
           "|---|---|---|---|---|---|---|"]
  fmt = lambda m, s, f: f"{m:{f}}" + (f" +- {s:{f}}" if s is not None else "")
  for s in summary:
    lines.append(f"| {s['dataset']} | {s['patch']} | {(32 // s['patch']) ** 2} | {s['seeds']} | "
                 f"{fmt(s['loss_mean'], s['loss_std'], '.4f')} | "
                 f"{fmt(100 * s['acc_mean'], None if s['acc_std'] is None else 100 * s['acc_std'], '.2f')}% | "
                 f"{s['images_per_sec']:.0f} |")
  lines += ["", "| dataset | patch | test loss change | seed std (pooled) | change / std |",
            "|---|---|---|---|---|"]
  for dataset in sorted({s["dataset"] for s in summary}):
    points = [s for s in summary if s["dataset"] == dataset]
    noise = seed_noise(summary, dataset)
    for a, b in zip(points, points[1:]):
      delta = b["loss_mean"] - a["loss_mean"]
      noise_text = f"{noise:.4f}" if noise else "n/a"
      ratio = f"{delta / noise:+.1f}" if noise else "n/a"
      lines.append(f"| {dataset} | {a['patch']} -> {b['patch']} | {delta:+.4f} | "
                   f"{noise_text} | {ratio} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for dataset, color in zip(sorted({s["dataset"] for s in summary}), ("C0", "C1", "C2")):
    points = [s for s in summary if s["dataset"] == dataset]
    patches = [s["patch"] for s in points]
    ax.errorbar(patches, [s["loss_mean"] for s in points],
                yerr=[s["loss_std"] or 0.0 for s in points], color=color, marker="o",
                capsize=3, label=dataset)
    seeds = [r for r in rows if r["dataset"] == dataset]
    ax.scatter([r["patch"] for r in seeds], [r["test_loss"] for r in seeds], color=color,
               s=10, alpha=0.4)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  patches = sorted({s["patch"] for s in summary})
  ax.set_xticks(patches, [str(p) for p in patches])
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
  ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
  ax.invert_xaxis()
  ax.set_xlabel("patch size (pixels per side)")
  ax.set_ylabel("test loss (cross-entropy)")
  ax.set_title("Smaller patches, same model and training images")
  ax.legend()
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(out: str, runs, report_dir: str) -> str:
  rows = collect(out, runs)
  if not rows:
    raise SystemExit(f"no finished runs under {out}")
  summary = summarize(rows)
  os.makedirs(report_dir, exist_ok=True)
  with open(os.path.join(report_dir, "results.json"), "w") as f:
    json.dump({"runs": rows, "summary": summary}, f, indent=1)
  table = markdown(summary)
  with open(os.path.join(report_dir, "results.md"), "w") as f:
    f.write(table)
  plot(rows, summary, os.path.join(report_dir, "patch_scaling.png"))
  return table


def main(argv):
  del argv
  runs = plan(FLAGS.datasets, FLAGS.patches, FLAGS.seeds, FLAGS.pixel_seeds)
  if not FLAGS.collect_only:
    run_all(runs, FLAGS.out, FLAGS.setting, FLAGS.override)
  print(report(FLAGS.out, runs, FLAGS.report_dir))


if __name__ == "__main__":
  define_flags()
  app.run(main)
