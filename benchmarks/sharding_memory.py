"""Per-device memory and collectives of the real train step under each layout.

  python -m benchmarks.sharding_memory                    # ViT-B/16, 8 virtual CPU devices
  python -m benchmarks.sharding_memory --model=S/16 --batch=64

Compile-only (nothing is trained, so it runs on a laptop): for data parallel,
FSDP, tensor parallel and FSDP x TP it builds the trainer's step for ViT-B/16
(AdamW, float32, 224x224, the config's default sharding rules), and prints
  - parameter + optimiser-state bytes held by one device (from the shardings),
  - XLA's memory analysis of the compiled step (arguments, temporaries, and
    their sum less aliased/donated buffers: the step's peak on one device),
  - the collectives in the compiled HLO (count and result bytes by kind).
"""
from __future__ import annotations

import os
import re
import sys

if "jax" not in sys.modules:  # virtual devices must be requested before JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from big_vision_like import configuration  # noqa: E402
from big_vision_like.parallel import mesh as mesh_lib  # noqa: E402
from big_vision_like.parallel import sharding  # noqa: E402
from big_vision_like.train import Trainer  # noqa: E402

_MODEL = flags.DEFINE_string("model", "B/16", "ViT variant.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_TENSOR = flags.DEFINE_integer("tensor", 4, "Tensor-parallel size (ViT-B: 12 heads).")
_LAYOUTS = flags.DEFINE_list("layouts", ["dp", "fsdp", "tp", "fsdp_tp"], "Presets to compile.")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8, "u64": 8}


def config_for(layout: str):
  config = configuration.defaults()
  config.total_steps = 1000
  config.input.batch_size = _BATCH.value
  config.model = dict(name="vit", variant=_MODEL.value, num_classes=1000, image_size=224,
                      pool="cls")
  config.parallelism = layout
  config.tensor_parallel = _TENSOR.value
  return config


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO result type such as 'f32[768,3072]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """kind -> (count, result bytes) over the compiled module's instructions."""
  out = {k: [0, 0] for k in COLLECTIVES}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(",
                     line)
    if match:
      out[match.group(2)][0] += 1
      out[match.group(2)][1] += _shape_bytes(match.group(1))
  return {k: tuple(v) for k, v in out.items()}


def measure(layout: str) -> dict:
  config = config_for(layout)
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config))
  with jax.set_mesh(mesh):
    trainer = Trainer(config, mesh, steps_per_epoch=1000)
    state = trainer.abstract_state
    per_device = sum(
        int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves((state["params"], state["opt_state"])))
    batch = {"image": jax.ShapeDtypeStruct((_BATCH.value, 224, 224, 3), np.float32,
                                           sharding=sharding.batch_sharding(mesh, 4)),
             "label": jax.ShapeDtypeStruct((_BATCH.value,), np.int32,
                                           sharding=sharding.batch_sharding(mesh, 1))}
    compiled = trainer.train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {"mesh": dict(mesh.shape), "state": per_device,
          "arguments": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
          "peak": peak, "collectives": collectives(compiled.as_text())}


def main(argv):
  del argv
  print(f"ViT-{_MODEL.value}, 224x224, global batch {_BATCH.value}, AdamW float32, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; bytes per device")
  rows = {layout: measure(layout) for layout in _LAYOUTS.value}
  base = rows[_LAYOUTS.value[0]]["state"]
  mib = lambda b: f"{b / 2**20:,.1f}"
  print("| layout | mesh (data, fsdp, tensor) | params + opt state MiB | vs "
        f"{_LAYOUTS.value[0]} | step arguments MiB | step temporaries MiB | step peak MiB |")
  print("|---|---|---|---|---|---|---|")
  for layout, r in rows.items():
    mesh = ", ".join(str(v) for v in r["mesh"].values())
    print(f"| {layout} | {mesh} | {mib(r['state'])} | {base / r['state']:.2f}x | "
          f"{mib(r['arguments'])} | {mib(r['temp'])} | {mib(r['peak'])} |")
  print()
  print("| layout | " + " | ".join(COLLECTIVES) + " |")
  print("|---|" + "---|" * len(COLLECTIVES))
  for layout, r in rows.items():
    cells = [f"{n} ({mib(b)} MiB)" if n else "0" for n, b in r["collectives"].values()]
    print(f"| {layout} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
