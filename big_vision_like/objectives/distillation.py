"""Self-distillation without labels: DINO (Caron et al. 2021) and iBOT (Zhou et al. 2022).

A student and a teacher of the same architecture; the teacher is an EMA of the
student (momentum rising to 1 on a cosine) and gets no gradient. The teacher
sees the 2 global crops, the student those and the local crops; the student
matches the teacher's centred, sharpened distribution over `out_dim`
prototypes on every pair of different crops. iBOT also masks patches of the
student's global crops and matches the teacher's patch tokens there. DINOv2's
KoLeo regulariser and Sinkhorn-Knopp centring are options.

The batch carries 'image' [B, 2, G, G, C] (global crops) and, with local
crops, 'local_crops' [B, n, L, L, C] — the 'multi_crop' transform makes both.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from big_vision_like.models import MODELS, backbone as backbone_lib, layers
from big_vision_like.objectives.base import Objective, ema_update, no_accumulation as \
    _no_accumulation, normalize
from big_vision_like.registry import ConfigError


class DinoHead(nnx.Module):
  """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to the prototypes."""

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int, bottleneck_dim: int,
               num_layers: int, norm_last_layer: bool, rngs: nnx.Rngs):
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    init = nnx.initializers.truncated_normal(0.02)
    self.mlp = nnx.List([layers.dense(a, b, ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"),
                                      kernel_init=init, rngs=rngs)
                         for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
    self.last_v = nnx.Param(init(rngs.params(), (bottleneck_dim, out_dim)))
    # norm_last_layer fixes the weight-norm gain at 1 (DINO's stabiliser).
    self.last_g = None if norm_last_layer else nnx.Param(jnp.ones((out_dim,)))

  def __call__(self, x: jax.Array, freeze_last: jax.Array | bool = False) -> jax.Array:
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = layers.gelu(x)
    x = normalize(x, eps=1e-12)
    v = self.last_v[...]
    # DINO keeps the last layer fixed for the first steps: no gradient to it.
    v = jnp.where(freeze_last, jax.lax.stop_gradient(v), v)
    w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
    if self.last_g is not None:
      g = self.last_g[...]
      w = w * jnp.where(freeze_last, jax.lax.stop_gradient(g), g)
    return x @ w


class Student(nnx.Module):
  def __init__(self, backbone, head, patch_head):
    self.backbone, self.head, self.patch_head = backbone, head, patch_head


def sinkhorn_knopp(logits: jax.Array, iterations: int = 3) -> jax.Array:
  """Balanced assignment of [B, K] teacher logits (already divided by the
  temperature) to prototypes; rows sum to 1 (DINOv2 / SwAV centring)."""
  q = jnp.exp(logits - logits.max()).T  # [K, B]
  q = q / q.sum()
  k, b = q.shape
  for _ in range(iterations):
    q = q / q.sum(axis=1, keepdims=True) / k
    q = q / q.sum(axis=0, keepdims=True) / b
  return (q * b).T


def koleo(features: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Kozachenko-Leonenko entropy estimate: -mean log distance to the nearest neighbour."""
  x = normalize(features)
  sims = x @ x.T - 2.0 * jnp.eye(x.shape[0])
  nearest = x[sims.argmax(1)]
  # eps inside the square root: identical neighbours give a finite gradient.
  distance = jnp.sqrt(jnp.sum((x - nearest) ** 2, axis=-1) + eps ** 2)
  return -jnp.log(distance).mean()


def cosine_momentum(step: jax.Array, total: int, base: float) -> jax.Array:
  """Teacher momentum from `base` up to 1 on a half cosine over the run."""
  progress = jnp.clip(step / max(total, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def teacher_temperature(step: jax.Array, warmup_steps: int, start: float, end: float):
  frac = jnp.clip(step / max(warmup_steps, 1), 0.0, 1.0)
  return start + frac * (end - start)


def cross_entropy_pairs(teacher_probs: jax.Array, student_logp: jax.Array) -> jax.Array:
  """Mean over the batch and over pairs of different crops of -sum q log p.

  teacher_probs [B, T, K] (global crops), student_logp [B, V, K] whose first T
  crops are the same global crops.
  """
  ce = -jnp.einsum("btk,bvk->btv", teacher_probs, student_logp)  # [B, T, V]
  t, v = ce.shape[1:]
  different = ~jnp.eye(t, v, dtype=bool)
  return (ce * different).sum((1, 2)).mean() / different.sum()


class Distillation(Objective):
  """'dino' (CLS distillation) and 'ibot' (+ masked patch distillation)."""
  name = "dino"
  masked_patches = False
  # The multi_crop transform says whether local crops come; no microbatches.
  reads = ("input.transforms", "input.batch_size", "optim.grad_accum_steps")
  # What DINO evaluates and transfers: the teacher's backbone.
  backbone_path = ("teacher", "backbone")
  # A pre-trained backbone starts both: the teacher is an EMA of the student.
  init_targets = (("student", "backbone"), ("teacher", "backbone"))

  def __init__(self, config: Any, *, out_dim: int = 65536,
               hidden_dim: int = 2048, bottleneck_dim: int = 256, head_layers: int = 3,
               norm_last_layer: bool = True, student_temp: float = 0.1,
               teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
               warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9,
               centering: str = "center", momentum_teacher: float = 0.996,
               freeze_last_layer_steps: int = 0, koleo_weight: float = 0.0,
               mask_probability: float = 0.5, mask_ratio: tuple = (0.1, 0.5),
               patch_loss_weight: float = 1.0, shared_head: bool = True, rngs: nnx.Rngs):
    """Temperatures and momentum follow DINO's defaults; `centering='sinkhorn'`
    replaces the EMA centre by Sinkhorn-Knopp (DINOv2). The mask_* and patch_*
    fields are iBOT's."""
    if centering not in ("center", "sinkhorn"):
      raise ConfigError(f"config.objective.centering={centering!r}; valid: center, sinkhorn")
    crop = [t for t in (config.input.transforms or ()) if t.get("name") == "multi_crop"]
    if not crop:
      raise ConfigError(f"objective {self.name!r} needs the 'multi_crop' transform in "
                        f"config.input.transforms (2 global + local crops per image)")
    model = dict(config.model)
    name = model.pop("name")
    if model.get("num_classes"):
      raise ConfigError(f"config.model.num_classes must be 0 for {self.name!r} "
                        f"(the DINO head replaces the classifier)")
    _no_accumulation(config, self.name, "its centre and teacher statistics")
    backbone = MODELS.build(name, model, field="config.model", rngs=rngs)
    if self.masked_patches:
      backbone_lib.require(backbone, "mask_tokens", "patch_tokens",
                           by="objective 'ibot' (it masks patch tokens)", name=name)
    if crop[0].get("num_local", 6) > 0:
      backbone_lib.require(backbone, "any_image_size", name=name,
                           by=f"objective {self.name!r} with local crops",
                           hint="; or set num_local=0 in the multi_crop transform")
    head_kw = dict(hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                   num_layers=head_layers, norm_last_layer=norm_last_layer, rngs=rngs)
    head = DinoHead(backbone.width, out_dim, **head_kw)
    patch_head = None
    if self.masked_patches and not shared_head:
      patch_head = DinoHead(backbone.width, out_dim, **head_kw)
    self.student = Student(backbone, head, patch_head)
    self.teacher = nnx.clone(self.student)
    self.mask_token = (nnx.Param(jnp.zeros((backbone.embed_width,))) if self.masked_patches
                       else None)
    self.center = nnx.BatchStat(jnp.zeros((1, out_dim)))
    self.patch_center = nnx.BatchStat(jnp.zeros((1, 1, out_dim))) if self.masked_patches \
        else None
    self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.student_temp, self.teacher_temp = student_temp, teacher_temp
    self.warmup_teacher_temp = warmup_teacher_temp
    self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
    self.center_momentum, self.centering = center_momentum, centering
    self.momentum_teacher = momentum_teacher
    self.freeze_last_layer_steps = freeze_last_layer_steps
    self.koleo_weight = koleo_weight
    self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
    self.patch_loss_weight = patch_loss_weight

  # -- pieces ---------------------------------------------------------------

  def _teacher_probs(self, logits: jax.Array, center: jax.Array, temp: jax.Array):
    if self.centering == "sinkhorn":
      flat = logits.reshape(-1, logits.shape[-1])
      return sinkhorn_knopp(flat / temp).reshape(logits.shape)
    return jax.nn.softmax((logits - center) / temp, axis=-1)

  def _update_center(self, center: nnx.BatchStat, logits: jax.Array) -> None:
    mean = logits.reshape(-1, logits.shape[-1]).mean(0)
    center[...] = center[...] * self.center_momentum + mean.reshape(center.shape) * (
        1.0 - self.center_momentum)

  def _token_mask(self, rng: jax.Array, batch: int, num_tokens: int) -> jax.Array:
    """iBOT: with probability mask_probability an image gets a random ratio of
    its patches masked (ratio uniform in mask_ratio)."""
    k_which, k_ratio, k_noise = jax.random.split(rng, 3)
    ratio = jax.random.uniform(k_ratio, (batch, 1), minval=self.mask_ratio[0],
                               maxval=self.mask_ratio[1])
    ratio = jnp.where(jax.random.bernoulli(k_which, self.mask_probability, (batch, 1)),
                      ratio, 0.0)
    return jax.random.uniform(k_noise, (batch, num_tokens)) < ratio

  @staticmethod
  def _flatten_crops(x: jax.Array) -> jax.Array:
    return x.reshape((-1,) + x.shape[2:])  # [B, n, ...] -> [B*n, ...], example-major

  def loss(self, batch, *, rng, train):
    if "image" not in batch or batch["image"].ndim != 5:
      raise ConfigError(f"objective {self.name!r} needs batch['image'] of global crops "
                        f"[batch, 2, size, size, channels] from the 'multi_crop' transform")
    step = self.step[...]
    k_mask, k_global, k_local = jax.random.split(rng, 3)
    globals_ = batch["image"]
    b, n_global = globals_.shape[:2]
    freeze = step < self.freeze_last_layer_steps
    temp = teacher_temperature(step, self.warmup_teacher_temp_steps,
                               self.warmup_teacher_temp, self.teacher_temp)

    # Teacher: global crops only, unmasked.
    flat_globals = self._flatten_crops(globals_)
    t_logits, t_out = self.teacher.backbone(flat_globals)
    t_cls = self.teacher.head(t_out["pre_logits"]).reshape(b, n_global, -1)
    t_cls = jax.lax.stop_gradient(t_cls)

    # Student: global crops (masked for iBOT) and local crops.
    token_mask = None
    if self.masked_patches:
      num_tokens = t_out["tokens"].shape[1]
      token_mask = self._token_mask(k_mask, b * n_global, num_tokens)
      _, s_out = self.student.backbone(flat_globals, train=train, rng=k_global,
                                       token_mask=token_mask, mask_token=self.mask_token[...])
    else:
      _, s_out = self.student.backbone(flat_globals, train=train, rng=k_global)
    s_cls = [self.student.head(s_out["pre_logits"], freeze).reshape(b, n_global, -1)]
    if "local_crops" in batch:
      locals_ = batch["local_crops"]
      _, l_out = self.student.backbone(self._flatten_crops(locals_), train=train, rng=k_local)
      s_cls.append(self.student.head(l_out["pre_logits"], freeze).reshape(
          b, locals_.shape[1], -1))
    s_logp = jax.nn.log_softmax(jnp.concatenate(s_cls, axis=1) / self.student_temp, -1)

    t_probs = self._teacher_probs(t_cls, self.center[...], temp)
    cls_loss = cross_entropy_pairs(t_probs, s_logp)
    loss, metrics = cls_loss, {"cls_loss": cls_loss, "teacher_temp": temp}

    if self.masked_patches:
      patch_head_t = self.teacher.patch_head or self.teacher.head
      patch_head_s = self.student.patch_head or self.student.head
      t_patch = jax.lax.stop_gradient(patch_head_t(t_out["tokens"]))  # [B*2, N, K]
      s_patch = patch_head_s(s_out["tokens"], freeze)
      t_patch_probs = self._teacher_probs(t_patch, self.patch_center[...], temp)
      ce = -(t_patch_probs * jax.nn.log_softmax(s_patch / self.student_temp, -1)).sum(-1)
      weights = token_mask.astype(jnp.float32)
      patch_loss = ((ce * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1.0)).mean()
      loss = loss + self.patch_loss_weight * patch_loss
      metrics["patch_loss"] = patch_loss
      if train:
        self._update_center(self.patch_center, t_patch)
    if self.koleo_weight:
      feats = s_out["pre_logits"].reshape(b, n_global, -1)
      reg = sum(koleo(feats[:, i]) for i in range(n_global))  # summed, as DINOv2
      loss = loss + self.koleo_weight * reg
      metrics["koleo"] = reg
    if train:
      self._update_center(self.center, t_cls)
    # Teacher entropy shows collapse (0) or uniformity (log out_dim).
    metrics["teacher_entropy"] = -(t_probs * jnp.log(t_probs + 1e-12)).sum(-1).mean()
    metrics["loss"] = loss
    return loss, metrics

  def after_update(self, step):
    momentum = cosine_momentum(step, self.total_steps, self.momentum_teacher)
    ema_update(self.teacher, self.student, momentum)
    self.step[...] = step + 1

  @property
  def backbone(self):
    return self.teacher.backbone

  def features(self, images):
    """The teacher backbone's pooled (CLS) features: what DINO evaluates."""
    return self.backbone(images)[1]["pre_logits"]


class IBot(Distillation):
  name = "ibot"
  masked_patches = True
