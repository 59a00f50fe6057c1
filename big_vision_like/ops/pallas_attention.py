"""The project's flash-attention kernels in Pallas (GPU / Triton lowering; CPU in interpret mode).

Forward: one program per (batch, head, query block) keeps its queries on chip
and streams key/value blocks with an online softmax in float32, writing the
output and the log-sum-exp.

Backward (a custom VJP, the flash-attention-2 split): `delta = rowsum(dO * O)`
in XLA, then two kernels that recompute each block's probabilities from the
saved log-sum-exp instead of storing them. One program per (batch, head, key
block) accumulates dK and dV over the query blocks; one per (batch, head,
query block) accumulates dQ over the key blocks. Nothing of size Lq x Lk is
written, except the bias gradient when a bias is given (a learned bias needs
one: Swin's relative-position table), which the dQ kernel writes block by
block and XLA sums over the axes the bias broadcasts along.

Lengths are padded to the block sizes and padded keys / queries masked; query
and key lengths may differ; an additive bias broadcast over batch and heads
and a boolean mask are folded into one additive bias read block by block.
Softmax statistics and all accumulators are float32 whatever the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from big_vision_like.ops import chunked

NEG = chunked.NEG
# Triton, not Mosaic GPU (JAX's default GPU lowering now): these kernels are written
# for Triton's block model (whole-block dots and transposes).
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------
# Kernels. Refs hold one (batch, head)'s rows: [length, head_dim] blocks.
# ----------------------------------------------------------------------------
def _block_logits(q, k, bias, scale, q_start, k_start, q_len, kv_len):
  """[bq, bk] float32 logits of one block; padded queries / keys get -inf."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  valid_q = q_start + jnp.arange(q.shape[0]) < q_len
  valid_k = k_start + jnp.arange(k.shape[0]) < kv_len
  return jnp.where(valid_q[:, None] & valid_k[None, :], s, -jnp.inf)


def _bias_block(bias_ref, rows, cols):
  """A [rows|1, cols] slice of the bias ref (a size-1 row axis broadcasts)."""
  if bias_ref is None:
    return None
  return bias_ref[rows if bias_ref.shape[0] > 1 else slice(None), cols]


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, scale: float,
                    block_k: int, q_len: int, kv_len: int):
  q = q_ref[...]
  block_q = q.shape[0]
  q_start = pl.program_id(2) * block_q

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _block_logits(q, k, _bias_block(bias_ref, slice(None), keys), scale,
                      q_start, j * block_k, q_len, kv_len)
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
  l = jnp.where(l > 0, l, 1.0)  # padded query rows: no valid key, output 0
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dk_ref, dv_ref,
                 *, scale: float, block_q: int, q_len: int, kv_len: int):
  """dK, dV of one key block, summed over every query block."""
  k, v = k_ref[...], v_ref[...]
  block_k = k.shape[0]
  k_start = pl.program_id(2) * block_k

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = _block_logits(q, k, _bias_block(bias_ref, rows, slice(None)), scale,
                      i * block_q, k_start, q_len, kv_len)
    p = jnp.exp(s - lse_ref[rows][:, None])  # [bq, bk]
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows][:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dq_ref, dbias_ref,
               *, scale: float, block_k: int, q_len: int, kv_len: int):
  """dQ of one query block, summed over every key block (and its dbias blocks)."""
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_start = pl.program_id(2) * q.shape[0]

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _block_logits(q, k, _bias_block(bias_ref, slice(None), keys), scale,
                      q_start, j * block_k, q_len, kv_len)
    p = jnp.exp(s - lse[:, None])
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if dbias_ref is not None:
      dbias_ref[:, keys] = ds
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# Layout: [B, L, H, D] <-> padded [B, H, L', D], block specs, the pallas_calls.
# ----------------------------------------------------------------------------
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


def _heads_first(x, block):
  """[B, L, H, D] -> [B, H, L', D'], L' a multiple of `block`, D' a power of two >= 16
  (zero features change no dot product)."""
  x = _pad(x.transpose(0, 2, 1, 3), 2, block)
  return _pad(x, 3, _block(x.shape[3], x.shape[3]))


def _padded_bias(bias, bq, bk, lk):
  """[B|1, H|1, Lq'|1, Lk'] float32: rows padded if present, key columns always."""
  if bias.shape[2] > 1:
    bias = _pad(bias, 2, bq)
  bias = jnp.broadcast_to(bias, bias.shape[:3] + (lk,))
  return _pad(bias, 3, bk)


def _rows_spec(block, d):
  """One (batch, head)'s block of rows n: [block, d] (or [block] when d is None)."""
  if d is None:
    return pl.BlockSpec((None, None, block), lambda i, j, n: (i, j, n))
  return pl.BlockSpec((None, None, block, d), lambda i, j, n: (i, j, n, 0))


def _whole_spec(length, d):
  """One (batch, head)'s whole sequence, whichever block the program owns."""
  if d is None:
    return pl.BlockSpec((None, None, length), lambda i, j, n: (i, j, 0))
  return pl.BlockSpec((None, None, length, d), lambda i, j, n: (i, j, 0, 0))


def _bias_spec(bias, rows, cols, by_rows: bool):
  """Bias blocks: a row block n (forward, dQ) or a column block n (dK/dV)."""
  bb, bh, brows, _ = bias.shape
  row_block = rows if brows > 1 else 1
  def index(i, j, n):
    b, h = (i if bb > 1 else 0), (j if bh > 1 else 0)
    if by_rows:
      return b, h, (n if brows > 1 else 0), 0
    return b, h, 0, n
  return pl.BlockSpec((None, None, row_block, cols), index)


def _forward(q, k, v, bias, scale, block_q, block_k, interpret):
  """q [B, Lq, H, D] etc. -> (out [B, Lq, H, D], lse [B, H, Lq])."""
  b, lq, h, head_dim = q.shape
  lk = k.shape[1]
  bq, bk = _block(lq, block_q), _block(lk, block_k)
  qt, kt, vt = _heads_first(q, bq), _heads_first(k, bk), _heads_first(v, bk)
  lq_pad, lk_pad, d = qt.shape[2], kt.shape[2], qt.shape[3]
  in_specs = [_rows_spec(bq, d), _whole_spec(lk_pad, d), _whole_spec(lk_pad, d)]
  args = [qt, kt, vt]
  if bias is not None:
    bias = _padded_bias(bias, bq, bk, lk)
    in_specs.append(_bias_spec(bias, bq, lk_pad, by_rows=True))
  else:
    in_specs.append(None)
  args.append(bias)
  kernel = functools.partial(_forward_kernel, scale=scale, block_k=bk, q_len=lq, kv_len=lk)
  out, lse = pl.pallas_call(
      kernel, grid=(b, h, lq_pad // bq), in_specs=in_specs,
      out_specs=[_rows_spec(bq, d), _rows_spec(bq, None)],
      out_shape=[jax.ShapeDtypeStruct((b, h, lq_pad, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq_pad), jnp.float32)],
      interpret=interpret, compiler_params=_TRITON, name="bvl_flash_forward",
  )(*args)
  return out[:, :, :lq, :head_dim].transpose(0, 2, 1, 3), lse[:, :, :lq]


def _backward(q, k, v, bias, scale, block_q, block_k, interpret, out, lse, dout,
              bias_grad: bool):
  """(dq, dk, dv, dbias) of `_forward`; dbias is None unless `bias_grad`."""
  b, lq, h, head_dim = q.shape
  lk = k.shape[1]
  bq, bk = _block(lq, block_q), _block(lk, block_k)
  qt, dot = _heads_first(q, bq), _heads_first(dout, bq)
  kt, vt = _heads_first(k, bk), _heads_first(v, bk)
  lq_pad, lk_pad, d = qt.shape[2], kt.shape[2], qt.shape[3]
  delta = (dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).transpose(0, 2, 1)
  delta, lse = _pad(delta, 2, bq), _pad(lse, 2, bq)  # [B, H, Lq']
  padded_bias = None if bias is None else _padded_bias(bias, bq, bk, lk)
  statics = dict(scale=scale, q_len=lq, kv_len=lk)

  # dK, dV: programs over key blocks; queries, dO and statistics whole.
  dkdv_specs = [_whole_spec(lq_pad, d), _rows_spec(bk, d), _rows_spec(bk, d),
                _whole_spec(lq_pad, d), _whole_spec(lq_pad, None), _whole_spec(lq_pad, None),
                None if bias is None else _bias_spec(padded_bias, lq_pad, bk, by_rows=False)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=bq, **statics),
      grid=(b, h, lk_pad // bk), in_specs=dkdv_specs,
      out_specs=[_rows_spec(bk, d), _rows_spec(bk, d)],
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                 jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      interpret=interpret, compiler_params=_TRITON, name="bvl_flash_backward_dkdv",
  )(qt, kt, vt, dot, lse, delta, padded_bias)

  # dQ (and the bias gradient): programs over query blocks; keys and values whole.
  dq_specs = [_rows_spec(bq, d), _whole_spec(lk_pad, d), _whole_spec(lk_pad, d),
              _rows_spec(bq, d), _rows_spec(bq, None), _rows_spec(bq, None),
              None if bias is None else _bias_spec(padded_bias, bq, lk_pad, by_rows=True)]
  out_specs = [_rows_spec(bq, d)]
  out_shape = [jax.ShapeDtypeStruct(qt.shape, q.dtype)]
  if bias_grad:
    out_specs.append(pl.BlockSpec((None, None, bq, lk_pad), lambda i, j, n: (i, j, n, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq_pad, lk_pad), jnp.float32))
  kernel = functools.partial(_dq_kernel, block_k=bk, **statics)
  if not bias_grad:
    kernel = functools.partial(_without_dbias, kernel)
  results = pl.pallas_call(
      kernel, grid=(b, h, lq_pad // bq), in_specs=dq_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret, compiler_params=_TRITON, name="bvl_flash_backward_dq",
  )(qt, kt, vt, dot, lse, delta, padded_bias)

  unpad = lambda x, length: x[:, :, :length, :head_dim].transpose(0, 2, 1, 3)
  dbias = None
  if bias_grad:  # sum ds over the axes the bias broadcasts along
    ds = results[1][:, :, :lq, :lk]
    axes = tuple(a for a in range(4) if bias.shape[a] == 1)
    dbias = ds.sum(axis=axes, keepdims=True).astype(bias.dtype)
  return unpad(results[0], lq), unpad(dk, lk), unpad(dv, lk), dbias


def _without_dbias(kernel, *refs):
  return kernel(*refs, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention(q, k, v, bias, scale, block_q, block_k, interpret, bias_grad):
  return _forward(q, k, v, bias, scale, block_q, block_k, interpret)[0]


def _attention_fwd(q, k, v, bias, scale, block_q, block_k, interpret, bias_grad):
  out, lse = _forward(q, k, v, bias, scale, block_q, block_k, interpret)
  return out, (q, k, v, bias, out, lse)


def _attention_bwd(scale, block_q, block_k, interpret, bias_grad, residuals, dout):
  q, k, v, bias, out, lse = residuals
  dq, dk, dv, dbias = _backward(q, k, v, bias, scale, block_q, block_k, interpret, out, lse,
                                dout, bias_grad)
  if bias is not None and dbias is None:
    dbias = jnp.zeros_like(bias)
  return dq, dk, dv, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


def _combined_bias(bias, mask):
  """Bias and mask as one additive [B|1, H|1, Lq|1, Lk|1] float32 array, or None."""
  out = None if bias is None else chunked.as_4d(bias).astype(jnp.float32)
  if mask is not None:
    additive = jnp.where(chunked.as_4d(mask), 0.0, NEG).astype(jnp.float32)
    out = additive if out is None else jnp.maximum(out + additive, NEG)
  return out


def pallas_attention(q, k, v, bias, mask, scale, *, block_q: int = 64, block_k: int = 64,
                     interpret: bool | None = None):
  """Same contract as the XLA reference. Compiled on GPU, interpreted elsewhere
  (`interpret=False` forces the Triton lowering, e.g. to lower for CUDA on a CPU host).

  Only a given `bias` gets a gradient (a mask alone costs no Lq x Lk array).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _attention(q, k, v, _combined_bias(bias, mask), float(scale), block_q, block_k,
                    interpret, bias is not None)
