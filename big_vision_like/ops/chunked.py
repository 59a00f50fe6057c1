"""Memory-efficient attention in plain XLA: O(sequence) memory instead of O(sequence^2).

Queries and keys are processed in chunks with an online softmax (running max
and sum), as in flash attention; the backward pass is a custom VJP that
recomputes each chunk's probabilities from the saved log-sum-exp instead of
storing them. Works on every platform, for long sequences on CPU.

Arbitrary lengths (padded internally to the chunk sizes), unequal query / key
lengths, an additive bias and a boolean mask that broadcast to [B, H, Lq, Lk]
(a size-1 axis stays size 1: a key-padding mask [B, 1, 1, Lk] is never
expanded), and gradients for q, k, v and the bias.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)  # a masked logit, as in the XLA reference


def as_4d(x):
  """A bias or mask [.., Lq|1, Lk|1] as [B|1, H|1, Lq|1, Lk|1] (None stays None)."""
  return None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)


def _pad_to(x, axis, multiple, value=0):
  size = x.shape[axis]
  pad = (-size) % multiple
  if not pad or size == 1:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _slice(x, i, j, cq, ck):
  """The [.., cq, ck] block (i, j) of a [.., Lq|1, Lk|1] array; size-1 axes broadcast."""
  if x is None:
    return None
  starts = [0] * (x.ndim - 2) + [i * cq if x.shape[-2] > 1 else 0,
                                 j * ck if x.shape[-1] > 1 else 0]
  sizes = list(x.shape[:-2]) + [cq if x.shape[-2] > 1 else 1, ck if x.shape[-1] > 1 else 1]
  return jax.lax.dynamic_slice(x, starts, sizes)


def _logits(qi, kj, bias_ij, mask_ij, valid_j, scale):
  """[B, H, cq, ck] float32 logits of one block, masked."""
  s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
  if bias_ij is not None:
    s = s + bias_ij.astype(jnp.float32)
  if mask_ij is not None:
    s = jnp.where(mask_ij, s, NEG)
  return jnp.where(valid_j[None, None, None, :], s, -jnp.inf)  # padding: weight exactly 0


def _prepare(q, k, v, bias, mask, cq, ck):
  lq, lk = q.shape[1], k.shape[1]
  cq, ck = min(cq, lq), min(ck, lk)
  q = _pad_to(q, 1, cq)
  k, v = _pad_to(k, 1, ck), _pad_to(v, 1, ck)
  if bias is not None:
    bias = _pad_to(_pad_to(bias, -2, cq), -1, ck)
  if mask is not None:
    mask = _pad_to(_pad_to(mask, -2, cq), -1, ck, value=False)
  valid = jnp.arange(k.shape[1]) < lk
  return q, k, v, bias, mask, valid, cq, ck


def _forward(q, k, v, bias, mask, scale, cq, ck):
  """Returns (out [B, Lq, H, D], lse [B, H, Lq]) on padded inputs."""
  b, lq, h, _ = q.shape
  qp, kp, vp, bias, mask, valid, cq, ck = _prepare(q, k, v, bias, mask, cq, ck)
  nq, nk = qp.shape[1] // cq, kp.shape[1] // ck

  def q_block(i):
    qi = jax.lax.dynamic_slice_in_dim(qp, i * cq, cq, axis=1)

    def body(carry, j):
      m, l, acc = carry
      kj = jax.lax.dynamic_slice_in_dim(kp, j * ck, ck, axis=1)
      vj = jax.lax.dynamic_slice_in_dim(vp, j * ck, ck, axis=1)
      s = _logits(qi, kj, _slice(bias, i, j, cq, ck), _slice(mask, i, j, cq, ck),
                  jax.lax.dynamic_slice_in_dim(valid, j * ck, ck), scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return (m_new, l, acc), None

    init = (jnp.full((b, h, cq), NEG, jnp.float32), jnp.zeros((b, h, cq), jnp.float32),
            jnp.zeros((b, h, cq, v.shape[-1]), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(nk))
    return acc / l[..., None], m + jnp.log(l)

  out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, H, cq, D], [nq, B, H, cq]
  out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * cq, h, -1)[:, :lq]
  lse = lse.transpose(1, 2, 0, 3).reshape(b, h, nq * cq)[:, :, :lq]
  return out.astype(q.dtype), lse


def _backward(q, k, v, bias, mask, scale, cq, ck, out, lse, dout):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qp, kp, vp, biasp, maskp, valid, cq, ck = _prepare(q, k, v, bias, mask, cq, ck)
  nq, nk = qp.shape[1] // cq, kp.shape[1] // ck
  dop = _pad_to(dout, 1, cq)
  delta = _pad_to((dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1), 1, cq)
  lsep = _pad_to(lse, -1, cq)
  dbias_shape = biasp.shape if biasp is not None else None

  def q_block(carry, i):
    dk, dv, dbias = carry
    qi = jax.lax.dynamic_slice_in_dim(qp, i * cq, cq, axis=1)
    doi = jax.lax.dynamic_slice_in_dim(dop, i * cq, cq, axis=1)
    lse_i = jax.lax.dynamic_slice_in_dim(lsep, i * cq, cq, axis=-1)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * cq, cq, axis=1).transpose(0, 2, 1)

    def k_block(carry, j):
      dq_i, dk, dv, dbias = carry
      kj = jax.lax.dynamic_slice_in_dim(kp, j * ck, ck, axis=1)
      vj = jax.lax.dynamic_slice_in_dim(vp, j * ck, ck, axis=1)
      s = _logits(qi, kj, _slice(biasp, i, j, cq, ck), _slice(maskp, i, j, cq, ck),
                  jax.lax.dynamic_slice_in_dim(valid, j * ck, ck), scale)
      p = jnp.exp(s - lse_i[..., None])  # [B, H, cq, ck]
      dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      dq_i = dq_i + jnp.einsum("bhqk,bkhd->bqhd", ds, kj.astype(jnp.float32)) * scale
      dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qi.astype(jnp.float32)) * scale
      dv_j = jnp.einsum("bhqk,bqhd->bkhd", p, doi.astype(jnp.float32))
      dk = jax.lax.dynamic_update_slice_in_dim(
          dk, jax.lax.dynamic_slice_in_dim(dk, j * ck, ck, axis=1) + dk_j, j * ck, axis=1)
      dv = jax.lax.dynamic_update_slice_in_dim(
          dv, jax.lax.dynamic_slice_in_dim(dv, j * ck, ck, axis=1) + dv_j, j * ck, axis=1)
      if dbias is not None:  # reduce ds over the axes the bias broadcasts along
        axes = tuple(a for a in range(4) if dbias_shape[a] == 1 and ds.shape[a] > 1)
        g = ds.sum(axis=axes, keepdims=True)
        start = [0, 0, i * cq if dbias_shape[2] > 1 else 0, j * ck if dbias_shape[3] > 1 else 0]
        current = jax.lax.dynamic_slice(dbias, start, g.shape)
        dbias = jax.lax.dynamic_update_slice(dbias, current + g, start)
      return (dq_i, dk, dv, dbias), None

    init = (jnp.zeros(qi.shape, jnp.float32), dk, dv, dbias)
    (dq_i, dk, dv, dbias), _ = jax.lax.scan(k_block, init, jnp.arange(nk))
    return (dk, dv, dbias), dq_i

  zeros_bias = None if biasp is None else jnp.zeros(biasp.shape, jnp.float32)
  init = (jnp.zeros(kp.shape, jnp.float32), jnp.zeros(vp.shape, jnp.float32), zeros_bias)
  (dk, dv, dbias), dq = jax.lax.scan(q_block, init, jnp.arange(nq))
  dq = dq.transpose(1, 0, 2, 3, 4).reshape(b, nq * cq, h, d)[:, :lq]
  dk, dv = dk[:, :lk], dv[:, :lk]
  if dbias is not None:
    dbias = dbias[..., :bias.shape[-2], :bias.shape[-1]].astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, bias, mask, scale, cq, ck):
  return _forward(q, k, v, bias, mask, scale, cq, ck)[0]


def _attention_fwd(q, k, v, bias, mask, scale, cq, ck):
  out, lse = _forward(q, k, v, bias, mask, scale, cq, ck)
  return out, (q, k, v, bias, mask, out, lse)


def _attention_bwd(scale, cq, ck, residuals, dout):
  q, k, v, bias, mask, out, lse = residuals
  dq, dk, dv, dbias = _backward(q, k, v, bias, mask, scale, cq, ck, out, lse, dout)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return dq, dk, dv, dbias, dmask


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, bias, mask, scale, *, q_chunk: int = 512,
                      k_chunk: int = 512):
  """Same contract as the XLA reference; bias and mask get 4-D [B|1, H|1, Lq|1, Lk|1]."""
  return _attention(q, k, v, as_4d(bias), as_4d(mask), float(scale), int(q_chunk),
                    int(k_chunk))
