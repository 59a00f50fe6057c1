"""CLIP and SigLIP losses over a batch split across devices (shard_map).

The dense losses in `contrastive.py` take the global batch's embeddings; under
jit XLA then materialises the B x B logits (split by rows at best). These take
the same embeddings, sharded over the data-parallel mesh axes, and compute the
same loss and gradients with less memory:

- `clip_loss_gathered`: each device all-gathers the text embeddings and scores
  its own images against the whole batch ([B/n, B] logits per device); the
  column softmax (text -> image) is reduced across devices. The gradient of the
  all-gather is a reduce-scatter, so it is exact.
- `siglip_loss_ring`: each device keeps its image embeddings and the text
  embeddings travel around a ring of devices (ppermute), n steps of [B/n, B/n]
  logits; the backward pass goes round the ring again with the text gradients
  travelling beside their texts. No device ever holds more than B/n x B/n
  logits, so per-device memory grows with B/n, not B (big_vision's chunked
  sigmoid loss, for the jit trainer).

Both also return the in-batch retrieval accuracies (exact: argmax over every
text / image of the global batch) without forming the full similarity matrix.
Positives: example i with text i, or, given `labels`, every pair with equal
labels (same-class captions).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _ring_size(axes) -> int:
  return math.prod(jax.lax.axis_size(a) for a in axes)


def _varying(tree, axes):
  """Marks loop-carry constants as differing per device, like the values they become."""
  return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), tree)


def _pair_ids(image_emb, labels):
  """What makes a pair positive: equal labels, else the same global index."""
  if labels is None:
    return jnp.arange(image_emb.shape[0], dtype=jnp.int32)
  return labels.astype(jnp.int32)


def _argmax_hits(sims, own_ids, other_ids):
  """Whether each row's most similar column is one of its positives."""
  return other_ids[jnp.argmax(sims, axis=1)] == own_ids


# ----------------------------------------------------------------------------
# CLIP: all-gather
# ----------------------------------------------------------------------------

def clip_loss_gathered(image_emb, text_emb, log_scale, labels=None, *, axes):
  """Symmetric InfoNCE of the global batch; embeddings [B, D] sharded over `axes`.

  Each device gathers the texts and forms its rows of the logits, [B/n, B]:
  the image->text softmax is over its own rows; the text->image softmax runs
  down the columns, whose log-sum-exp is combined across devices (pmax, psum).
  Returns (loss, i2t_accuracy, t2i_accuracy), all replicated.
  """
  axes = tuple(axes)

  def local(img, txt, log_scale, ids):
    b = img.shape[0]
    n = b * _ring_size(axes)
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    all_ids = jax.lax.all_gather(ids, axes, tiled=True)
    positives = ids[:, None] == all_ids[None, :]  # [b, B], fused into its uses
    logits = jnp.exp(log_scale) * img @ all_txt.T
    positive_logits = jnp.where(positives, logits, 0.0)
    # image -> text: each row is a softmax over the whole batch of texts
    i2t = (jax.nn.logsumexp(logits, axis=1)
           - positive_logits.sum(1) / positives.sum(1)).sum()
    # text -> image: column j's softmax spans every device's rows
    fixed = jax.lax.stop_gradient(logits)  # for the shift and the accuracies
    col_max = jax.lax.pmax(fixed.max(0), axes)
    col_lse = col_max + jnp.log(jax.lax.psum(jnp.exp(logits - col_max).sum(0), axes))
    col_positives = jax.lax.psum(positives.sum(0), axes)
    t2i = col_lse.sum() / _ring_size(axes) - (positive_logits.sum(0) / col_positives).sum()
    total = jax.lax.psum(i2t + t2i, axes)
    # accuracies: the best text per local image; the best image per text
    i2t_hits = _argmax_hits(fixed, ids, all_ids).sum()
    offset = jax.lax.axis_index(axes) * b
    rows = offset + jnp.argmax(fixed, 0)  # first best row here, global index
    first_best = jax.lax.pmin(jnp.where(fixed.max(0) == col_max, rows, n), axes)
    owner = (first_best >= offset) & (first_best < offset + b)
    t2i_hits = (owner & (ids[jnp.clip(first_best - offset, 0, b - 1)] == all_ids)).sum()
    hits = jax.lax.psum(jnp.stack([i2t_hits, t2i_hits]), axes)
    return total / (2 * n), hits[0] / n, hits[1] / n

  spec = P(axes)
  return jax.shard_map(local, in_specs=(spec, spec, P(), spec),
                       out_specs=(P(), P(), P()))(
      image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
      jnp.asarray(log_scale, jnp.float32), _pair_ids(image_emb, labels))


# ----------------------------------------------------------------------------
# SigLIP: ring of text chunks, with its own backward ring
# ----------------------------------------------------------------------------

def _shift(x, axes):
  """Sends this device's block to the next device of the ring."""
  n = _ring_size(axes)
  return jax.lax.ppermute(x, axes, [(i, (i + 1) % n) for i in range(n)])


def _pair_terms(img, txt, ids_img, ids_txt, log_t, bias):
  """Logits and labels (+1 positive, -1 negative) of one [b, b] block."""
  dots = img @ txt.T
  logits = jnp.exp(log_t) * dots + bias
  signs = jnp.where(ids_img[:, None] == ids_txt[None, :], 1.0, -1.0)
  return dots, logits, signs


def _ring_forward(img, txt, ids, log_t, bias, axes):
  """Per-device sums over the ring: loss, and the best similarity seen per row and
  per travelling text (for the retrieval accuracies)."""
  b = img.shape[0]
  n = _ring_size(axes)

  def step(_, carry):
    txt_c, ids_c, loss, best_i, hit_i, best_t, hit_t = carry
    dots, logits, signs = _pair_terms(img, txt_c, ids, ids_c, log_t, bias)
    loss = loss - jax.nn.log_sigmoid(signs * logits).sum()
    # image -> text: running argmax over the chunks seen so far
    row_max = dots.max(1)
    row_hit = ids_c[jnp.argmax(dots, 1)] == ids
    better = row_max > best_i
    best_i, hit_i = jnp.where(better, row_max, best_i), jnp.where(better, row_hit, hit_i)
    # text -> image: the running max travels with the text chunk
    col_max = dots.max(0)
    col_hit = ids[jnp.argmax(dots, 0)] == ids_c
    better = col_max > best_t
    best_t, hit_t = jnp.where(better, col_max, best_t), jnp.where(better, col_hit, hit_t)
    txt_c, ids_c, best_t, hit_t = (_shift(v, axes) for v in (txt_c, ids_c, best_t, hit_t))
    return txt_c, ids_c, loss, best_i, hit_i, best_t, hit_t

  neg = jnp.full((b,), -jnp.inf, jnp.float32)
  no = jnp.zeros((b,), bool)
  init = (txt, ids) + _varying((jnp.zeros((), jnp.float32), neg, no, neg, no), axes)
  # After n shifts every text chunk (and its running max) is back home.
  _, _, loss, _, hit_i, _, hit_t = jax.lax.fori_loop(0, n, step, init)
  return loss, hit_i.sum(), hit_t.sum()


def _ring_backward(img, txt, ids, log_t, bias, g, axes):
  """Gradients of the summed loss (times g): the text gradient accumulates
  while it travels with its chunk and arrives home after n shifts."""

  def step(_, carry):
    txt_c, ids_c, dtxt_c, dimg, dlog_t, dbias = carry
    dots, logits, signs = _pair_terms(img, txt_c, ids, ids_c, log_t, bias)
    # d/dlogits of -log_sigmoid(s * l) = -s * sigmoid(-s * l)
    dlogits = g * -signs * jax.nn.sigmoid(-signs * logits)
    t = jnp.exp(log_t)
    dimg = dimg + t * dlogits @ txt_c
    dtxt_c = dtxt_c + t * dlogits.T @ img
    dlog_t = dlog_t + (dlogits * dots).sum() * t
    dbias = dbias + dlogits.sum()
    txt_c, ids_c, dtxt_c = (_shift(v, axes) for v in (txt_c, ids_c, dtxt_c))
    return txt_c, ids_c, dtxt_c, dimg, dlog_t, dbias

  zero = jnp.zeros((), jnp.float32)
  init = (txt, ids, jnp.zeros_like(txt), jnp.zeros_like(img)) + _varying((zero, zero), axes)
  _, _, dtxt, dimg, dlog_t, dbias = jax.lax.fori_loop(0, _ring_size(axes), step, init)
  return dimg, dtxt, jax.lax.psum(dlog_t, axes), jax.lax.psum(dbias, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _siglip_ring(img, txt, ids, log_t, bias, axes):
  return _siglip_ring_fwd(img, txt, ids, log_t, bias, axes)[0]


def _in_specs(axes):
  """img, txt, ids split over the ring; log_t, bias replicated."""
  return (P(axes),) * 3 + (P(), P())


def _siglip_ring_fwd(img, txt, ids, log_t, bias, axes):
  def local(img, txt, ids, log_t, bias):
    loss, hit_i, hit_t = _ring_forward(img, txt, ids, log_t, bias, axes)
    n = img.shape[0] * _ring_size(axes)
    stats = jax.lax.psum(jnp.stack([loss, hit_i.astype(jnp.float32),
                                    hit_t.astype(jnp.float32)]), axes)
    return stats[0] / n, stats[1] / n, stats[2] / n

  out = jax.shard_map(local, in_specs=_in_specs(axes), out_specs=(P(), P(), P()))(
      img, txt, ids, log_t, bias)
  return out, (img, txt, ids, log_t, bias)


def _siglip_ring_bwd(axes, residuals, cotangents):
  img, txt, ids, log_t, bias = residuals
  g = cotangents[0] / img.shape[0]  # the loss is a mean over the B images
  def local(img, txt, ids, log_t, bias, g):
    return _ring_backward(img, txt, ids, log_t, bias, g, axes)

  dimg, dtxt, dlog_t, dbias = jax.shard_map(
      local, in_specs=_in_specs(axes) + (P(),), out_specs=(P(axes), P(axes), P(), P()))(
          img, txt, ids, log_t, bias, g)
  return dimg, dtxt, None, dlog_t, dbias


_siglip_ring.defvjp(_siglip_ring_fwd, _siglip_ring_bwd)


def siglip_loss_ring(image_emb, text_emb, log_t, bias, labels=None, *, axes):
  """SigLIP's sigmoid loss of the global batch (summed over texts, mean over images),
  embeddings [B, D] sharded over `axes`. Returns (loss, i2t_accuracy, t2i_accuracy)."""
  return _siglip_ring(image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                      _pair_ids(image_emb, labels), jnp.asarray(log_t, jnp.float32),
                      jnp.asarray(bias, jnp.float32), tuple(axes))
