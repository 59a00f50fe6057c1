"""Training-step memory per image for ViT-B at 224x224, patch 16 down to 1 (pixels).

  python -m benchmarks.pixel_memory                       # the README table
  python -m benchmarks.pixel_memory --patches=16,8 --implementations=chunked

Compile-only, through XLA's memory analysis of the real trainer step (AdamW,
bf16 activations, float32 parameters, the config's remat / scan switches), so it runs on
a CPU: nothing is allocated. "Per image" is the slope between two batch sizes,
(temp(B2) - temp(B1)) / (B2 - B1): the bytes each extra image costs, without the
parameters, gradients and optimiser state that a batch shares. Printed next to
the published figures for the same setting with FlashAttention in fp16.

The Pallas kernel is left out on CPU: there it is interpreted (XLA loops), so
its memory says nothing about the GPU kernel. On a GPU pass
--implementations=xla,chunked,pallas.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from big_vision_like import configuration
from big_vision_like.parallel import mesh as mesh_lib
from big_vision_like.train import Trainer

_PATCHES = flags.DEFINE_list("patches", ["16", "8", "4", "2", "1"], "Patch sizes.")
_IMPLEMENTATIONS = flags.DEFINE_list("implementations", ["xla", "chunked"],
                                     "Attention implementations (ops.IMPLEMENTATIONS).")
_REMAT = flags.DEFINE_list("remat", ["none", "block"], "none: keep activations; block: "
                           "scan over the blocks and recompute each in the backward pass "
                           "(config.model.scan + remat); unrolled: remat without scan.")
# config.model fields of each remat policy. XLA's CPU scheduler keeps the
# activations of an unrolled remat alive anyway (measured: no saving), so the
# memory-saving policy scans over the blocks.
REMAT = {"none": dict(remat=False, scan=False), "block": dict(remat=True, scan=True),
         "unrolled": dict(remat=True, scan=False)}
_BATCHES = flags.DEFINE_list("batches", ["16", "32"], "The two batch sizes of the slope: "
                             "large enough that activations outgrow the buffers XLA reuses.")

# Per image, ViT-B at 224x224, FlashAttention, fp16 (the patch-scaling paper).
PUBLISHED = {16: 62e6, 8: 252e6, 4: 1.0e9, 2: 4.1e9, 1: 16.1e9}


def temp_bytes(patch: int, implementation: str, remat: str, batch: int) -> int:
  config = configuration.defaults()
  config.total_steps = 1000
  config.input.batch_size = batch
  config.model = dict(name="vit", variant=f"B/{patch}", num_classes=1000, image_size=224,
                      pool="gap", dtype="bfloat16", attention=implementation, **REMAT[remat])
  mesh = mesh_lib.make_mesh(mesh_lib.config_axes(config), jax.devices()[:1])
  with jax.set_mesh(mesh):
    trainer = Trainer(config, mesh, steps_per_epoch=1000)
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, 224, 224, 3), np.float32),
                  "label": jax.ShapeDtypeStruct((batch,), np.int32)}
    compiled = trainer.train_step.lower(trainer.abstract_state, batch_spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def human(b: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if abs(b) >= size:
      return f"{b / size:,.1f} {unit}"
  return f"{b / 1e3:,.0f} kB"


def main(argv):
  del argv
  b1, b2 = (int(b) for b in _BATCHES.value)
  print(f"ViT-B, 224x224, AdamW, bf16 activations, float32 params; training-step "
        f"temporaries per image = slope between batch {b1} and {b2}; "
        f"{jax.devices()[0].platform}, compile only")
  header = "| patch | tokens | " + " | ".join(
      f"{i} / {r}" for i in _IMPLEMENTATIONS.value for r in _REMAT.value)
  print(header + " | published (FlashAttention, fp16) |")
  print("|---" * (3 + len(_IMPLEMENTATIONS.value) * len(_REMAT.value)) + "|")
  for patch in (int(p) for p in _PATCHES.value):
    cells = []
    for implementation in _IMPLEMENTATIONS.value:
      for remat in _REMAT.value:
        start = time.perf_counter()
        one, two = (temp_bytes(patch, implementation, remat, b) for b in (b1, b2))
        cells.append(human((two - one) / (b2 - b1)))
        print(f"  [p{patch} {implementation} {remat}: batch {b1} {human(one)}, batch {b2} "
              f"{human(two)}, compiled in {time.perf_counter() - start:.0f} s]", flush=True)
    print(f"| {patch} | {(224 // patch) ** 2:,} | " + " | ".join(cells) +
          f" | {human(PUBLISHED[patch])} |", flush=True)


if __name__ == "__main__":
  app.run(main)
