"""Per-device memory of the contrastive losses' forward+backward, dense vs shard_map.

  python -m benchmarks.contrastive_memory             # 8 virtual CPU devices
  python -m benchmarks.contrastive_memory --batches=4096,16384 --dim=768

Compile-only (XLA's memory analysis of the jitted value-and-grad, so it runs
here): for global batches B with embeddings [B, dim] split over 8 devices,
the temporaries one device needs for
  - dense:      `contrastive.clip_loss` / `siglip_loss` under jit (XLA lays
                out the B x B logits over the devices as it sees fit),
  - all-gather: `clip_loss_gathered` ([B/8, B] logits per device),
  - ring:       `siglip_loss_ring` ([B/8, B/8] logits per device per step),
and the bytes the collectives of the compiled program produce, counted once per
HLO instruction: the ring's ppermute sits in a loop and runs 8 times per pass
(forward: 8 x [B/8, dim] texts, backward: texts and their gradients).
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # virtual devices must be requested before JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from big_vision_like.objectives import contrastive  # noqa: E402
from big_vision_like.objectives import contrastive_distributed as distributed  # noqa: E402
from big_vision_like.parallel import mesh as mesh_lib  # noqa: E402
from benchmarks.sharding_memory import collectives  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["1024", "4096", "16384", "32768"], "Global batches.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding width.")


def compiled_step(loss_fn, batch: int, mesh):
  """value_and_grad(loss_fn) for [batch, dim] embeddings, compiled."""
  emb = jax.ShapeDtypeStruct((batch, _DIM.value), jnp.float32,
                             sharding=NamedSharding(mesh, P("data")))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
  return step.lower(emb, emb, scalar, scalar).compile()


def measure(loss_fn, batch: int, mesh) -> tuple[int, int]:
  """(temporary bytes per device, bytes produced by collectives per device)."""
  compiled = compiled_step(loss_fn, batch, mesh)
  moved = sum(b for _, b in collectives(compiled.as_text()).values())
  return compiled.memory_analysis().temp_size_in_bytes, moved


LOSSES = {
    "CLIP dense": lambda i, t, s, b: contrastive.clip_loss(i, t, s),
    "CLIP all-gather": lambda i, t, s, b: distributed.clip_loss_gathered(
        i, t, s, axes=("data",))[0],
    "SigLIP dense": lambda i, t, s, b: contrastive.siglip_loss(i, t, s, b),
    "SigLIP ring": lambda i, t, s, b: distributed.siglip_loss_ring(
        i, t, s, b, axes=("data",))[0],
}


def main(argv):
  del argv
  mesh = mesh_lib.make_mesh((("data", -1),))
  n = mesh.shape["data"]
  print(f"Loss forward+backward, embeddings [B, {_DIM.value}] float32 over {n} "
        f"{jax.devices()[0].platform} devices, per device: temporaries MiB "
        f"(collective results MiB); B x B float32 logits for scale")
  print("| B | B x B logits | " + " | ".join(LOSSES) + " | SigLIP dense / ring |")
  print("|---|---|" + "---|" * len(LOSSES) + "---|")
  with jax.set_mesh(mesh):
    for batch in map(int, _BATCHES.value):
      sizes = {name: measure(fn, batch, mesh) for name, fn in LOSSES.items()}
      cells = " | ".join(f"{t / 2**20:,.1f} ({c / 2**20:,.1f})" for t, c in sizes.values())
      ratio = sizes["SigLIP dense"][0] / max(sizes["SigLIP ring"][0], 1)
      print(f"| {batch:,} | {batch * batch * 4 / 2**20:,.0f} | {cells} | {ratio:,.1f}x |")


if __name__ == "__main__":
  app.run(main)
