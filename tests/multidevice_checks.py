"""Computations that need 8 devices, run in a subprocess by tests/test_sharding.py.

XLA's virtual CPU devices must be requested before JAX starts, which a pytest
process has already done with one device; so the tests run this file as
`python tests/multidevice_checks.py OUT.json` under
XLA_FLAGS=--xla_force_host_platform_device_count=8 and assert on its results.
It only computes; every assertion lives in the test.
"""
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_vision_like import checkpoint as checkpoint_lib  # noqa: E402
from big_vision_like import data, ops, train  # noqa: E402
from big_vision_like.objectives import contrastive, contrastive_distributed  # noqa: E402
from big_vision_like.parallel import mesh as mesh_lib  # noqa: E402
from big_vision_like.parallel import sharding  # noqa: E402
from tests import helpers  # noqa: E402

# name -> (mesh axes, number of devices)
LAYOUTS = {
    "one_device": ((("data", 1), ("fsdp", 1), ("tensor", 1)), 1),
    "dp": (mesh_lib.PRESETS["dp"](2), 8),
    "fsdp": (mesh_lib.PRESETS["fsdp"](2), 8),
    "tp": (mesh_lib.PRESETS["tp"](2), 8),
    "fsdp_tp": (mesh_lib.PRESETS["fsdp_tp"](2), 8),
}


def _mesh(name):
  axes, n = LAYOUTS[name]
  return mesh_lib.make_mesh(axes, jax.devices()[:n])


def _batches(config, steps):
  source = data.build_source(config.input, "config.input")
  iterator = data.train_iterator(config.input, source, config.seed)
  return [next(iterator) for _ in range(steps)]


def _train(config, mesh, batches):
  """Losses of a few steps, per-device parameter bytes, and the final params."""
  with jax.set_mesh(mesh):
    trainer = train.Trainer(config, mesh, steps_per_epoch=10)
    state = trainer.init_state()
    losses = []
    for batch in batches:
      state, metrics = trainer.train_step(state, sharding.put_batch(batch, mesh))
      losses.append(float(metrics["train/loss"]))
    device = mesh.devices.flat[0]
    per_device = sum(s.data.nbytes for leaf in jax.tree.leaves(
        (state["params"], state["opt_state"])) for s in leaf.addressable_shards
        if s.device == device)
    return losses, per_device, state, trainer


def layouts():
  """The same config under each layout: losses and per-device state bytes."""
  out = {}
  for objective in ("supervised", "siglip", "perceiver"):
    if objective == "perceiver":  # a float32 Perceiver IO on 8x8 digits
      config = helpers.config_from("configs/perceiver_cifar10.py:smoke")
      config.input.update(source="digits", data_dir=None, transforms=[{"name": "normalize"}])
      config.model.update(image_size=8, channels=1, dtype="float32", qk_channels=16,
                          cross_heads=2)
    else:
      config = (helpers.tiny_config() if objective == "supervised" else
                helpers.config_from("configs/siglip_cifar10.py:smoke"))
    config.input.batch_size = 32
    config.optim.warmup_steps, config.optim.lr = 0, 1e-2  # steps that move the loss
    batches = _batches(config, 4)
    # The others under the layouts that change their mesh axes the most.
    names = LAYOUTS if objective == "supervised" else ("one_device", "dp", "fsdp_tp")
    for name in names:
      losses, per_device, _, _ = _train(config, _mesh(name), batches)
      out[f"{objective}/{name}"] = {"losses": losses, "state_bytes_per_device": per_device}
    if objective == "supervised":  # the Pallas kernels inside the sharded trainer
      config.model.attention = "pallas"
      losses, _, _, _ = _train(config, _mesh("fsdp_tp"), batches)
      out["supervised_pallas/fsdp_tp"] = {"losses": losses}
  return out


def contrastive_losses():
  """Sharded CLIP / SigLIP losses, accuracies and gradients next to the dense ones."""
  rng = np.random.RandomState(0)
  b, d = 32, 16
  img = rng.randn(b, d).astype(np.float32)
  txt = img + 1.5 * rng.randn(b, d).astype(np.float32)  # some pairs retrievable
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  labels = rng.randint(0, 5, b).astype(np.int32)
  out = {}
  for mesh_axes in ([("data", 8)], [("data", 2), ("fsdp", 4)], [("data", 4), ("tensor", 2)]):
    mesh = mesh_lib.make_mesh(mesh_axes)
    axes = sharding.batch_axes(mesh, (("batch", ("data", "fsdp")),))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
    with jax.set_mesh(mesh):
      g_img, g_txt, g_lab = (jax.device_put(x, spec) for x in (img, txt, labels))
      for with_labels in (False, True):
        lab, g_l = (labels, g_lab) if with_labels else (None, None)
        positives = None if lab is None else lab[:, None] == lab[None]
        key = f"{'x'.join(f'{a}{s}' for a, s in mesh_axes)}/{'labels' if with_labels else 'pairs'}"
        cases = {
            "clip": (lambda i, t, s, _b: contrastive.clip_loss(i, t, s, positives),
                     lambda i, t, s, _b: contrastive_distributed.clip_loss_gathered(
                         i, t, s, g_l, axes=axes)),
            "siglip": (lambda i, t, s, bias: contrastive.siglip_loss(i, t, s, bias, positives),
                       lambda i, t, s, bias: contrastive_distributed.siglip_loss_ring(
                           i, t, s, bias, g_l, axes=axes)),
        }
        for loss_name, (dense, sharded) in cases.items():
          args = (jnp.float32(1.7), jnp.float32(-2.0))
          ref, ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(img, txt, *args)
          (got, accs), grads = jax.jit(jax.value_and_grad(
              lambda *a: (lambda out: (out[0], out[1:]))(sharded(*a)), argnums=(0, 1, 2, 3),
              has_aux=True))(g_img, g_txt, *args)
          ids = np.arange(b) if lab is None else lab
          sims = img @ txt.T
          out[f"{loss_name}/{key}"] = {
              "loss": float(got), "reference": float(ref),
              "grad_max_abs_diff": [float(np.abs(np.asarray(g) - np.asarray(r)).max())
                                    for g, r in zip(grads, ref_grads)],
              "accuracy": [float(a) for a in accs],
              "reference_accuracy": [float((ids[sims.argmax(1)] == ids).mean()),
                                     float((ids[sims.argmax(0)] == ids).mean())],
          }
  return out


def kernels_per_shard():
  """The Pallas kernel under a data x tensor mesh (shard_map over batch and heads)
  next to the XLA reference on one device; and whether any input was gathered."""
  rng = np.random.RandomState(1)
  q, k, v = (rng.randn(8, 24, 4, 16).astype(np.float32) for _ in range(3))
  bias = rng.randn(1, 4, 24, 24).astype(np.float32)  # shared over the batch (Swin)
  mask = np.arange(24)[None, None, None, :] < rng.randint(1, 25, (8, 1, 1, 1))
  target = rng.randn(8, 24, 4, 16).astype(np.float32)

  def loss(implementation, axes):
    def f(q, k, v, bias):
      out = ops.dot_product_attention(q, k, v, bias=bias, mask=mask, shard_axes=axes,
                                      implementation=implementation)
      return ((out - target) ** 2).sum()
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))

  ref, ref_grads = loss("xla", None)(q, k, v, bias)
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  with jax.set_mesh(mesh):
    axes = sharding.kernel_axes()
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    qkv_spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
    args = [put(x, qkv_spec) for x in (q, k, v)] + [put(bias, jax.sharding.PartitionSpec())]
    step = jax.jit(loss("pallas", axes))
    got, grads = step(*args)
    hlo = step.lower(*args).compile().as_text()
  return {"kernel_axes": [list(a) if isinstance(a, (tuple, list)) else a for a in axes],
          "loss": float(got), "reference": float(ref),
          "grad_max_abs_diff": [float(np.abs(np.asarray(g) - np.asarray(r)).max())
                                for g, r in zip(grads, ref_grads)],
          "all_gathers": hlo.count("all-gather-start(") + hlo.count("all-gather(")}


def restore_anywhere():
  """A checkpoint written under 8-way data parallel, read under 4x2 and 1 device."""
  config = helpers.tiny_config()
  config.input.batch_size = 32
  batches = _batches(config, 2)
  workdir = tempfile.mkdtemp()
  try:
    _, _, state, trainer = _train(config, _mesh("dp"), batches)
    saved = jax.tree.map(np.asarray, state["params"])
    source = data.build_source(config.input, "config.input")
    iterator = data.train_iterator(config.input, source, config.seed)
    ckpt = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
    ckpt.save(2, state, iterator)
    ckpt.close()
    out = {}
    for name, axes, n in (("fsdp4_tensor2", (("data", 1), ("fsdp", 4), ("tensor", 2)), 8),
                          ("one_device", (("data", 1), ("fsdp", 1), ("tensor", 1)), 1)):
      mesh = mesh_lib.make_mesh(axes, jax.devices()[:n])
      with jax.set_mesh(mesh):
        trainer = train.Trainer(config, mesh, steps_per_epoch=10)
        reader = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
        restored, step, _ = reader.restore(trainer.abstract_state,
                                        data.train_iterator(config.input, source, config.seed))
        reader.close()
        diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                             restored["params"], saved)
        shardings = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(restored["params"])}
        out[name] = {"step": step, "max_abs_diff": max(jax.tree.leaves(diffs)),
                     "devices": len(restored["step"].sharding.device_set),
                     "param_specs": sorted(shardings)}
    return out
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  results = {"devices": jax.device_count(), "layouts": layouts(),
             "contrastive": contrastive_losses(), "restore": restore_anywhere(),
             "kernels": kernels_per_shard()}
  with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=1)
