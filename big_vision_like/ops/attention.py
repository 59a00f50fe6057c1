"""The one attention entry point every model calls.

Shapes follow `jax.nn.dot_product_attention`: q [B, Lq, H, D], k and v
[B, Lk, H, D]. Query and key lengths may differ (Perceiver cross-attention).
`bias` is added to the logits and broadcasts to [B, H, Lq, Lk] (Swin's relative
position bias and shift mask); `mask` is boolean, True where attention is
allowed, and broadcasts the same way (key padding).

Implementations are chosen by name so that models and configs can switch
kernels without touching model code: 'xla' (reference, materialises the
logits), 'chunked' (O(sequence) memory, any platform), 'pallas' (the project's
flash kernel: GPU, or CPU in interpret mode), 'cudnn' (GPU) and 'auto' (xla for
short sequences, chunked for long ones; the GPU kernels are opt-in until they
are benchmarked on the hardware). Softmax statistics are kept in float32
whatever the input dtype.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from big_vision_like.ops.chunked import chunked_attention
from big_vision_like.ops.pallas_attention import pallas_attention


def _xla_attention(q, k, v, bias, mask, scale):
  """Reference: materialises the [B, H, Lq, Lk] logits, float32 softmax."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _cudnn_attention(q, k, v, bias, mask, scale):
  """cuDNN's fused flash attention (GPU; fp16 / bf16)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation="cudnn")


IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": _xla_attention,
    "chunked": chunked_attention,
    "cudnn": _cudnn_attention,
    "pallas": pallas_attention,
}
# 'pallas' is compiled (Triton) on GPU and interpreted on CPU, slowly: for tests.
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "chunked": ("cpu", "gpu", "tpu"),
             "cudnn": ("gpu",), "pallas": ("gpu", "cpu")}
# Above this many logits per (batch, head), 'auto' avoids materialising them.
CHUNK_ABOVE = 2048 * 2048


def _resolve(implementation: str, q, k) -> Callable:
  platform = jax.default_backend()
  if implementation == "auto":
    long = q.shape[1] * k.shape[1] >= CHUNK_ABOVE
    return IMPLEMENTATIONS["chunked" if long else "xla"]
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is unknown; valid: "
        f"{', '.join(['auto', *sorted(IMPLEMENTATIONS)])}")
  if platform not in PLATFORMS[implementation]:
    available = [n for n, p in PLATFORMS.items() if platform in p]
    raise ValueError(f"attention implementation {implementation!r} is not available on "
                     f"{platform}; available there: {', '.join(['auto', *available])}")
  return IMPLEMENTATIONS[implementation]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None,
                          mask: jax.Array | None = None,
                          scale: float | None = None,
                          implementation: str = "auto") -> jax.Array:
  """Multi-head attention softmax(q k^T * scale + bias) v, masked."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, length, heads, head_dim] "
                     f"inputs, got q{q.shape} k{k.shape} v{v.shape}")
  if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
    raise ValueError(f"attention shapes disagree: q{q.shape} k{k.shape} v{v.shape}")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return _resolve(implementation, q, k)(q, k, v, bias, mask, scale)
