"""Building blocks shared by the backbones: every parameter carries logical axis names.

Layer-norm eps and GELU flavour are arguments because the public models we
match differ on them (timm ViT: eps 1e-6, exact GELU).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_vision_like import ops
from big_vision_like.parallel import sharding

Initializer = nnx.initializers.Initializer


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, g):
  """dW contracts over every token; transposing the narrower of x and g for it is
  XLA CPU's cheapest layout (left alone it copies the wider, e.g. the MLP's
  [tokens, 4 x width] gradient, into a transposed buffer)."""
  x, w = residuals
  dx = g @ w.T
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  over_rows = (((0,), (0,)), ((), ()))
  if x2.shape[1] <= g2.shape[1]:
    dw = jax.lax.dot_general(x2, g2, over_rows)
  else:
    dw = jax.lax.dot_general(g2, x2, over_rows).T
  return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear_dot(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`dot_general` for nnx.Linear: `lax.dot_general`, except on CPU, where
  [..., in] x [in, out] goes through `_matmul` (1.12x on the 32x32 ViT's CPU
  training step, docs/cpu_speed.md). A GPU / TPU process traces the plain dot
  only (nnx.Linear's own semantics, forward-mode autodiff included); a CPU
  process lowering for another platform (`lowering_platforms=('cuda',)`) gets
  the plain dot there through `lax.platform_dependent`."""
  def plain(x, w):
    return jax.lax.dot_general(x, w, dimension_numbers, precision=precision, **kwargs)

  custom = (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
            and precision is None and not any(v is not None for v in kwargs.values()))
  if not custom or jax.default_backend() != "cpu":
    return plain(lhs, rhs)
  return jax.lax.platform_dependent(lhs, rhs, cpu=_matmul, default=plain)


def dense(in_features: int, out_features: int, axes: Sequence[str | None], *,
          rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init: Initializer = nnx.initializers.xavier_uniform(),
          use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)), dot_general=linear_dot,
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[-1],)),
      rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               dtype=jnp.float32, param_dtype=jnp.float32, axis: str = "embed") -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (axis,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axis,)),
      rngs=rngs)


def drop_path(x: jax.Array, rate: jax.Array | float, rng: jax.Array | None,
              train: bool) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example."""
  if not train or rng is None:
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  return jnp.where(mask, x / jnp.maximum(keep, 1e-6), 0).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention projections around the shared `ops` entry point: the one
  block ViT, Swin (windows, with a bias) and Perceiver (cross-attention) build on.

  Queries and keys may come from different sequences and widths (`kv_width`,
  cross-attention) and attend in `qk_width` channels (Perceiver); the output is
  projected back to `width`. Parameters: query, key, value, out.
  """

  def __init__(self, width: int, num_heads: int, *, kv_width: int | None = None,
               qk_width: int | None = None, kv_axis: str = "embed",
               implementation: str = "auto", qkv_bias: bool = True, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """`kv_axis`: the logical name of the key / value inputs' channels.
    `qkv_bias=False`: query, key and value without biases, the out projection
    keeps its own (DINOv2 / timm `qkv_bias`)."""
    kv_width = kv_width or width
    qk_width = qk_width or width
    if qk_width % num_heads:
      raise ValueError(f"attention width {qk_width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = implementation
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.query = dense(width, qk_width, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.key = dense(kv_width, qk_width, (kv_axis, "heads"), use_bias=qkv_bias, **kw)
    self.value = dense(kv_width, qk_width, (kv_axis, "heads"), use_bias=qkv_bias, **kw)
    self.out = dense(qk_width, width, ("heads", "embed"), **kw)

  def attend(self, x: jax.Array, kv: jax.Array | None = None, *,
             bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    kv = x if kv is None else kv
    # [..., seq, heads, head_dim], heads split over the tensor axis.
    split = lambda t: sharding.constrain(
        t.reshape(t.shape[:-1] + (self.num_heads, -1)),
        ("batch",) + (None,) * (t.ndim - 2) + ("act_heads", None))
    q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
    out = ops.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                    implementation=self.implementation,
                                    shard_axes=sharding.kernel_axes())
    return self.out(out.reshape(out.shape[:-2] + (-1,)))

  def __call__(self, x: jax.Array, kv: jax.Array | None = None, *,
               bias: jax.Array | None = None, mask: jax.Array | None = None):
    return self.attend(x, kv, bias=bias, mask=mask)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], pixels of a patch (row, col, channel):
  a stride-p convolution's input as a matmul's (cheap even at p = 1). The one
  patchify of ViT, Swin, Perceiver and the masked-modelling targets."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // patch, w // patch, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int) -> jax.Array:
  """Inverse of `patchify`: [B, h, w, p*p*C] -> [B, h*p, w*p, C]."""
  b, gh, gw, d = patches.shape
  c = d // (patch * patch)
  x = patches.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, c)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as torch / timm compute it, x * (1 + erf(x / sqrt 2)) / 2.

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA's CPU backend
  lowers to exponentials and selects: this form gives the same values (within
  2e-6 of float64 in float32) and made the 32x32 ViT's training step ~5% faster on CPU
  (benchmarks/train_throughput.py)."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs,
               activation: str = "gelu", dtype=jnp.float32, param_dtype=jnp.float32):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype,
              kernel_init=nnx.initializers.xavier_uniform())
    self.fc1 = dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, width, ("mlp", "embed"), **kw)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.activation](self.fc1(x))
    h = sharding.constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("act_mlp",))
    return self.fc2(h)


class SwiGLU(nnx.Module):
  """Gated MLP, fc2(silu(gate(x)) * fc1(x)) (Shazeer 2020; DINOv2's ViT-g).

  `gate` is what SwiGLU adds to `Mlp`; `fc1` / `fc2` keep the Mlp's roles. HF's
  `Dinov2SwiGLUFFN` is the same function: its packed `weights_in` [2h, D]
  splits into (gate, fc1), `weights_out` is fc2. `hidden` is the width of the
  gated layer itself (HF derives it from mlp_ratio, see convert_hf).
  """

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype,
              kernel_init=nnx.initializers.xavier_uniform())
    self.gate = dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc1 = dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate(x)) * self.fc1(x)
    h = sharding.constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("act_mlp",))
    return self.fc2(h)


class LayerScale(nnx.Module):
  def __init__(self, width: int, init_value: float, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((width,), init_value, param_dtype),
                           out_sharding=("embed",))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.):
  """Fixed 2-D sine-cosine position embedding, [1, height*width, dim] (MoCo v3)."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {dim}")
  y, x = jnp.mgrid[:height, :width]
  omega = 1.0 / temperature ** (jnp.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe[None].astype(jnp.float32)


RESAMPLE_METHODS = ("bilinear", "bicubic", "bicubic_antialias")


def resample_posemb(posemb: jax.Array, old_grid: tuple[int, int],
                    new_grid: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resizes [1, h*w, D] grid embeddings to another grid (a new input size).

  'bilinear': `jax.image.resize` (antialiased when shrinking), our default.
  'bicubic': torch's `interpolate(mode='bicubic', align_corners=False)`, what
  HF ViT and DINOv2 use. 'bicubic_antialias': the same with `antialias=True`,
  timm's `resample_abs_pos_embed` default and HF DINOv2-with-registers'.
  Nothing in jax computes torch's kernels (`jax.image.resize`'s 'bicubic' is
  Keys a = -0.5 with other borders), so these are per-axis [new, old] weight
  matrices (`torch_bicubic_weights`) applied in one einsum: jit-able and within
  ~1e-6 of torch in float32.
  """
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"position-embedding resampling method {method!r}; valid: "
                     f"{', '.join(RESAMPLE_METHODS)}")
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  d = posemb.shape[-1]
  grid = posemb.reshape(1, *old_grid, d)
  if method == "bilinear":
    grid = jax.image.resize(grid, (1, *new_grid, d), method="bilinear")
  else:
    wh, ww = (jnp.asarray(torch_bicubic_weights(int(o), int(n), method == "bicubic_antialias"),
                          jnp.float32) for o, n in zip(old_grid, new_grid))
    grid = jnp.einsum("ih,jw,bhwd->bijd", wh, ww, grid.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(posemb.dtype)
  return grid.reshape(1, new_grid[0] * new_grid[1], d)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def torch_bicubic_weights(old: int, new: int, antialias: bool = False) -> np.ndarray:
  """[new, old] float64 weights of torch's 1-D bicubic resize, align_corners=False.

  Plain (ATen `upsample_bicubic2d`): the 4 taps around the source coordinate
  (i + 0.5) * old / new - 0.5, Keys a = -0.75, indices clamped to the border
  (whose weights then add up). Antialiased (`_upsample_bicubic2d_aa`, PIL's
  filter): a = -0.5, the kernel stretched by old / new when shrinking, taps
  outside the input dropped and the rest renormalised, so it differs from the
  plain one when enlarging too. Both equal torch's float64 output to 1e-14.
  """
  scale = old / new
  rows = np.arange(new)
  w = np.zeros((new, old))
  if not antialias:
    src = (rows + 0.5) * scale - 0.5
    base = np.floor(src)
    for k in range(-1, 3):
      taps = np.clip(base + k, 0, old - 1).astype(int)
      np.add.at(w, (rows, taps), _cubic(src - base - k, -0.75))
    return w
  stretch = max(scale, 1.0)
  for i in rows:
    center = scale * (i + 0.5)
    # int() truncates toward zero, as the C++ cast does
    lo = max(int(center - 2 * stretch + 0.5), 0)
    hi = min(int(center + 2 * stretch + 0.5), old)
    taps = np.arange(lo, hi)
    k = _cubic((taps + 0.5 - center) / stretch, -0.5)
    w[i, taps] = k / k.sum()
  return w
