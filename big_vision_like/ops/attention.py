"""The one attention entry point every model calls.

Shapes follow `jax.nn.dot_product_attention`: q [B, Lq, H, D], k and v
[B, Lk, H, D]. Query and key lengths may differ (Perceiver cross-attention).
`bias` is added to the logits and broadcasts to [B, H, Lq, Lk] (Swin's relative
position bias and shift mask); `mask` is boolean, True where attention is
allowed, and broadcasts the same way (key padding).

Implementations are chosen by name so that models and configs can switch
kernels without touching model code: 'xla' (the reference the others are tested
against: plain XLA on every platform, materialises the logits), 'openblas' (CPU:
the reference with its two products through OpenBLAS, ops/cpu_gemm.py, in
float32 on one device, XLA's dots otherwise; needs the `cpu` extra), 'chunked'
(O(sequence) memory, any platform), 'pallas' (the project's flash kernels,
forward and backward: GPU via Triton, or CPU in interpret mode), 'cudnn' (GPU)
and 'auto' (see `choose`). Softmax statistics are kept in float32 whatever the
input dtype.

Under a mesh, a kernel XLA cannot partition (pallas, cudnn) runs per shard
inside `jax.shard_map` when the caller passes the mesh axes of its batch and
heads (`shard_axes`): each device attends over its own examples and heads, and
no input is gathered.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_vision_like.ops import cpu_gemm
from big_vision_like.ops.chunked import as_4d, chunked_attention
from big_vision_like.ops.pallas_attention import pallas_attention


def _materialised(einsum):
  """Attention that materialises the [B, H, Lq, Lk] logits, float32 softmax, with
  its two products by `einsum`."""
  def attention(q, k, v, bias, mask, scale):
    logits = einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return einsum("bhqk,bkhd->bqhd", weights, v)
  return attention


_xla_attention = _materialised(jnp.einsum)  # the reference
_openblas_attention = _materialised(cpu_gemm.einsum)


def _cudnn_attention(q, k, v, bias, mask, scale):
  """cuDNN's fused flash attention (GPU; fp16 / bf16)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation="cudnn")


IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": _xla_attention,
    "openblas": _openblas_attention,
    "chunked": chunked_attention,
    "cudnn": _cudnn_attention,
    "pallas": pallas_attention,
}
# 'pallas' is compiled (Triton) on GPU and interpreted on CPU, slowly: for tests.
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "openblas": ("cpu",),
             "chunked": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",), "pallas": ("gpu", "cpu")}
# Kernels XLA cannot partition: run per shard under a mesh.
PER_SHARD = ("pallas", "cudnn")
# From this many logits per (batch, head), 'auto' avoids materialising them. On
# CPU the chunked path is already faster at 1,024 tokens (benchmarks/attention.py:
# forward+backward 0.51x / 0.82x of XLA's time at head dims 64 / 128).
CHUNK_FROM = {"cpu": 1024 * 1024}
CHUNK_FROM_DEFAULT = 2048 * 2048


def choose(platform: str, q_len: int, k_len: int) -> str:
  """What 'auto' runs: while the logits are small the XLA reference, or on CPU its
  OpenBLAS form where that can be built (ViT-Ti/16 step 1.31x, docs/cpu_speed.md);
  then the fused kernel on GPU and the chunked XLA attention elsewhere (the Pallas
  kernels are Triton kernels; TPU gets the chunked path)."""
  if q_len * k_len < CHUNK_FROM.get(platform, CHUNK_FROM_DEFAULT):
    return "openblas" if platform == "cpu" and cpu_gemm.usable() else "xla"
  return "pallas" if platform == "gpu" else "chunked"


def _resolve(implementation: str, q, k) -> str:
  platform = jax.default_backend()
  if implementation == "auto":
    return choose(platform, q.shape[1], k.shape[1])
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is unknown; valid: "
        f"{', '.join(['auto', *sorted(IMPLEMENTATIONS)])}")
  if platform not in PLATFORMS[implementation]:
    available = [n for n, p in PLATFORMS.items() if platform in p]
    raise ValueError(f"attention implementation {implementation!r} is not available on "
                     f"{platform}; available there: {', '.join(['auto', *available])}")
  if implementation == "openblas" and (reason := cpu_gemm.unavailable_reason()):
    raise ValueError(f"attention implementation 'openblas' is unavailable here: {reason}; "
                     f"'xla' is the same without OpenBLAS")
  return implementation


def _check_shapes(q, k, v, bias, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, length, heads, head_dim] "
                     f"inputs, got q{q.shape} k{k.shape} v{v.shape}")
  for axis, what in ((0, "batch sizes"), (2, "head counts"), (3, "head dims")):
    if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
      raise ValueError(f"attention {what} disagree: q{q.shape} k{k.shape} v{v.shape} "
                       f"(axis {axis})")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"attention key and value lengths disagree: k{k.shape} v{v.shape}")
  logits = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  for name, x in (("bias", bias), ("mask", mask)):
    if x is None:
      continue
    full = (1,) * (4 - x.ndim) + tuple(x.shape)
    if x.ndim > 4 or any(s not in (1, t) for s, t in zip(full, logits)):
      raise ValueError(f"attention {name} of shape {tuple(x.shape)} does not broadcast to "
                       f"the logits [batch, heads, q_len, k_len] = {logits}")


def _per_shard(fn, q, k, v, bias, mask, scale, shard_axes):
  """`fn` on each device's examples and heads (shard_map), or as is outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or shard_axes is None:
    return fn(q, k, v, bias, mask, scale)

  def usable(axes, size):  # mesh axes that split `size` evenly, else replicate
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    split = math.prod(mesh.shape[n] for n in names)
    return axes if names and split > 1 and size % split == 0 else None

  batch, heads = usable(shard_axes[0], q.shape[0]), usable(shard_axes[1], q.shape[2])
  if batch is None and heads is None:
    return fn(q, k, v, bias, mask, scale)
  qkv = P(batch, None, heads, None)
  extras = [x for x in (as_4d(bias), as_4d(mask)) if x is not None]
  extra_specs = [P(batch if x.shape[0] > 1 else None, heads if x.shape[1] > 1 else None)
                 for x in extras]

  def local(q, k, v, *extra):
    extra = iter(extra)
    b = next(extra) if bias is not None else None
    m = next(extra) if mask is not None else None
    return fn(q, k, v, b, m, scale)

  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, *extra_specs), out_specs=qkv,
                       check_vma=False)(q, k, v, *extras)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None,
                          mask: jax.Array | None = None,
                          scale: float | None = None,
                          implementation: str = "auto",
                          shard_axes: tuple[str | Sequence[str] | None,
                                            str | Sequence[str] | None] | None = None
                          ) -> jax.Array:
  """Multi-head attention softmax(q k^T * scale + bias) v, masked.

  `shard_axes` = (mesh axes of the batch, mesh axes of the heads), as the
  models' sharding rules resolve them; used only by the per-shard kernels.
  """
  _check_shapes(q, k, v, bias, mask)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  name = _resolve(implementation, q, k)
  fn = IMPLEMENTATIONS[name]
  if name in PER_SHARD:
    return _per_shard(fn, q, k, v, bias, mask, scale, shard_axes)
  return fn(q, k, v, bias, mask, scale)
