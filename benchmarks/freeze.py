"""What freezing saves: the train step with all, half or none of the backbone frozen.

  python -m benchmarks.freeze                      # ViT 32x32 (vit32), batch 128
  python -m benchmarks.freeze --setting=vit_ti16 --steps=6

`config.optim.frozen` takes parameters out of the differentiated set, so the
backward pass skips their weight gradients (and, below the lowest trained
layer, the activation gradients too) and the optimiser never touches them.
Median step time of `--steps` steps (train_throughput's `measure`), FLOPs by
XLA's cost analysis, and each against full fine-tuning in the same run.
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import train_throughput

_SETTING = flags.DEFINE_string("setting", "vit32", "A train_throughput setting (a ViT).")

ROWS = (("full fine-tuning", ()),
        ("blocks 0-2 + embeddings frozen", (r"^backbone/(embedding|pos_embedding|cls_token"
                                            r"|blocks/[0-2]/)",)),
        ("backbone frozen, head trains", (r"^backbone/(?!head/)",)))


def main(argv):
  del argv
  rows = [(label, train_throughput.measure(_SETTING.value, optim={"frozen": frozen}))
          for label, frozen in ROWS]
  base = rows[0][1]
  print(f"\n{_SETTING.value}, batch {base['batch']}, median of "
        f"{train_throughput._STEPS.value} steps")  # pylint: disable=protected-access
  print("| config.optim.frozen | step (ms) | x full | GFLOP/step | x full |")
  print("|---|---|---|---|---|")
  for label, r in rows:
    print(f"| {label} | {r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f} | "
          f"{r['gflop_step']:.2f} | {r['gflop_step'] / base['gflop_step']:.2f} |")


if __name__ == "__main__":
  app.run(main)
