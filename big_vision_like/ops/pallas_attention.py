"""The project's flash-attention kernel in Pallas (GPU / Triton lowering; CPU in interpret mode).

Forward: one program per (batch, head, query block) keeps its queries on chip
and streams key/value blocks with an online softmax in float32, writing the
output and the log-sum-exp. Lengths are padded to the block sizes and padded
keys masked; query and key lengths may differ; an additive bias broadcast over
batch and heads (Swin's relative-position bias and shift mask) and a boolean
mask are folded into one additive bias read block by block.

Backward: a custom VJP that recomputes each block's probabilities from the
saved log-sum-exp (the flash-attention backward). It currently runs as the
chunked XLA backward of `ops.chunked` (same algorithm, O(sequence) memory), so
gradients are exact and memory-efficient on every platform; a Pallas backward
kernel is the next step for GPU speed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from big_vision_like.ops import chunked

NEG = chunked.NEG


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, scale: float,
                    block_k: int, kv_len: int):
  q = q_ref[...]
  block_q = q.shape[0]

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    if bias_ref is not None:
      s = s + bias_ref[:, keys].astype(jnp.float32)
    valid = j * block_k + jnp.arange(block_k) < kv_len
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=1)
    acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _pad(x, axis, multiple):
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _block(length: int, preferred: int) -> int:
  """A power-of-two block no larger than needed (Triton wants powers of two)."""
  block = 16
  while block < min(length, preferred):
    block *= 2
  return block


def _combined_bias(bias, mask):
  """Bias and mask as one additive [B|1, H|1, Lq|1, Lk|1] float32 array, or None."""
  expand = lambda x: x.reshape((1,) * (4 - x.ndim) + x.shape)
  out = None if bias is None else expand(bias).astype(jnp.float32)
  if mask is not None:
    additive = jnp.where(expand(mask), 0.0, NEG).astype(jnp.float32)
    out = additive if out is None else jnp.maximum(out + additive, NEG)
  return out


def _forward(q, k, v, bias, scale, block_q, block_k, interpret):
  """q [B, Lq, H, D] etc. -> (out [B, Lq, H, D], lse [B, H, Lq])."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = _block(lq, block_q), _block(lk, block_k)
  qt = _pad(q.transpose(0, 2, 1, 3), 2, bq)  # [B, H, Lq', D]
  kt = _pad(k.transpose(0, 2, 1, 3), 2, bk)
  vt = _pad(v.transpose(0, 2, 1, 3), 2, bk)
  lq_pad, lk_pad = qt.shape[2], kt.shape[2]
  grid = (b, h, lq_pad // bq)
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda i, j, n: (i, j, n, 0)),
      pl.BlockSpec((None, None, lk_pad, d), lambda i, j, n: (i, j, 0, 0)),
      pl.BlockSpec((None, None, lk_pad, d), lambda i, j, n: (i, j, 0, 0)),
  ]
  args = [qt, kt, vt]
  if bias is not None:
    bb, bh, brows, bcols = bias.shape
    if brows > 1:
      bias = _pad(bias, 2, bq)
    if bcols == 1:
      bias = jnp.broadcast_to(bias, bias.shape[:3] + (lk,))
    bias = _pad(bias, 3, bk)  # padded keys are masked in the kernel anyway
    rows = bq if brows > 1 else 1
    in_specs.append(pl.BlockSpec(
        (None, None, rows, lk_pad),
        lambda i, j, n: (i if bb > 1 else 0, j if bh > 1 else 0, n if brows > 1 else 0, 0)))
    args.append(bias)
  else:
    in_specs.append(None)
    args.append(None)
  kernel = functools.partial(_forward_kernel, scale=scale, block_k=bk, kv_len=lk)
  out, lse = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d), lambda i, j, n: (i, j, n, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, j, n: (i, j, n))],
      out_shape=[jax.ShapeDtypeStruct((b, h, lq_pad, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq_pad), jnp.float32)],
      interpret=interpret, name="bvl_flash_forward",
  )(*args)
  return out[:, :, :lq].transpose(0, 2, 1, 3), lse[:, :, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, bias, scale, block_q, block_k, interpret):
  return _forward(q, k, v, bias, scale, block_q, block_k, interpret)[0]


def _attention_fwd(q, k, v, bias, scale, block_q, block_k, interpret):
  out, lse = _forward(q, k, v, bias, scale, block_q, block_k, interpret)
  return out, (q, k, v, bias, out, lse)


def _attention_bwd(scale, block_q, block_k, interpret, residuals, dout):
  del interpret
  q, k, v, bias, out, lse = residuals
  dq, dk, dv, dbias = chunked._backward(q, k, v, bias, None, scale, 512, 512,  # pylint: disable=protected-access
                                        out, lse, dout)
  return dq, dk, dv, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


def pallas_attention(q, k, v, bias, mask, scale, *, block_q: int = 64, block_k: int = 64):
  """Same contract as the XLA reference. Compiled on GPU, interpreted elsewhere."""
  interpret = jax.default_backend() != "gpu"
  return _attention(q, k, v, _combined_bias(bias, mask), float(scale), block_q, block_k,
                    interpret)
