"""Float32 products on CPU through OpenBLAS instead of XLA's own dots.

XLA's CPU dots run attention's small batched products (ViT-Ti/16: 96 items of
197 x 64 x 197) at 25-90 GFLOP/s; OpenBLAS reaches 95-190 and PyTorch 117-188 on
the same machine (docs/cpu_investigations.md). `einsum` sends a two-operand
float32 contraction to `cpu_gemm.cc`, an XLA FFI custom call that runs OpenBLAS
sgemm on XLA's own threads, reading operands in place through strides (attention's
[B, L, H, D] heads need no transpose). Gradients are products of the same kind.
The 'openblas' attention of ops/attention.py uses it; the dense layers do not
(inside the training step they were slower through it: a custom call ends XLA's
fusions around the dot).

CPU only, and optional. The custom call is compiled with the system C++ compiler
on first use, against jaxlib's FFI headers and the `scipy-openblas32` wheel (the
`cpu` extra: pip install 'big_vision_like[cpu]'), and cached under
~/.cache/big_vision_like (or $BVL_CACHE_DIR). Nothing is built or imported unless
the process's default backend is CPU. Where the custom call is impossible (no
wheel, no compiler: `unavailable_reason` says which, logged once) or pointless
(not float32, a multi-device mesh: XLA cannot partition a custom call), `einsum`
is `jnp.einsum`; BVL_CPU_GEMM=0 turns it off. `enabled()` says which one a trace
gets, and a trace lowered for another platform (`lowering_platforms=('cuda',)`)
gets `jnp.einsum` there (`jax.lax.platform_dependent`).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")
_TARGET = "bvl_cpu_gemm"
_FIELDS = 16  # the geometry array of cpu_gemm.cc
EXTRA = "pip install 'big_vision_like[cpu]'"  # what brings scipy-openblas32


class Unavailable(RuntimeError):
  """The custom call cannot be built or loaded here (the reason is the message)."""


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("BVL_CACHE_DIR",
                                     pathlib.Path.home() / ".cache" / "big_vision_like"))


def _compile(openblas) -> pathlib.Path:
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise Unavailable("no C++ compiler found (set CXX)")
  key = hashlib.sha256(_SOURCE.read_bytes() + jax.__version__.encode() +
                       openblas.get_lib_dir().encode()).hexdigest()[:16]
  library = _cache_dir() / f"cpu_gemm_{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as build:
    partial = pathlib.Path(build) / library.name
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-o", str(partial),
               str(_SOURCE), f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}",
               f"-L{openblas.get_lib_dir()}", f"-l{openblas.get_library()}",
               f"-Wl,-rpath,{openblas.get_lib_dir()}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
      raise Unavailable(f"compiling {_SOURCE.name} failed ({compiler}): {last}")
    partial.replace(library)  # atomic: concurrent first uses never see half a file
  return library


@functools.cache
def _register() -> None:
  """Builds (once per machine) and registers the custom call; raises Unavailable."""
  try:
    import scipy_openblas32 as openblas
  except ImportError as e:
    raise Unavailable(f"the scipy-openblas32 wheel is not installed ({EXTRA})") from e
  library = ctypes.CDLL(str(_compile(openblas)))
  library.BvlCpuGemmInit()
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.BvlCpuGemm),
                              platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
  """Why the custom call cannot run in this process (one line, logged once), or
  None when it can. Builds it on first call: call it on CPU only."""
  if os.environ.get("BVL_CPU_GEMM", "1") == "0":
    return "switched off by BVL_CPU_GEMM=0"
  try:
    _register()
    return None
  except (Unavailable, OSError) as e:  # OSError: an unwritable cache, a bad library
    logging.warning("OpenBLAS CPU matmuls unavailable, using XLA's: %s", e)
    return str(e)


def available() -> bool:
  return unavailable_reason() is None


_disabled = 0


@contextlib.contextmanager
def disabled():
  """Traces inside use XLA's dots (e.g. to count FLOPs: XLA's cost analysis does
  not see into a custom call). Affects tracing only: a function already traced
  outside keeps its trace."""
  global _disabled
  _disabled += 1
  try:
    yield
  finally:
    _disabled -= 1


def _single_device() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.size == 1 if not mesh.empty else jax.device_count() == 1


def usable() -> bool:
  """Whether traces in this process may use the custom call at all: a CPU default
  backend (checked first: no build elsewhere), not `disabled()`, and built."""
  return not _disabled and jax.default_backend() == "cpu" and available()


def enabled(*operands) -> bool:
  """Whether `einsum` on these operands runs through OpenBLAS in the current trace
  (when it is lowered for CPU)."""
  return (not _disabled and jax.default_backend() == "cpu" and _single_device()
          and all(x.dtype == jnp.float32 for x in operands) and available())


# ---------------------------------------------------------------------------------
# An einsum as strided batched GEMMs.

def _parse(spec: str):
  inputs, out = spec.replace(" ", "").split("->")
  x, y = inputs.split(",")
  letters = set(x) | set(y)
  if any(len(set(s)) != len(s) for s in (x, y, out)) or not set(out) <= letters:
    raise ValueError(f"einsum {spec!r}: repeated or unknown output index")
  batch = [c for c in out if c in x and c in y]
  m = [c for c in x if c in out and c not in y]
  n = [c for c in y if c in out and c not in x]
  k = [c for c in x if c in y and c not in out]
  if len(batch) + len(m) + len(n) + len(k) != len(letters):
    raise ValueError(f"einsum {spec!r}: an index summed within one operand")
  return x, y, out, batch, m, n, k


def _strides(shape):
  return [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]


def _group(term, shape, letters):
  """(size, stride) of `letters` read as one index of `term`, or None when they
  are not adjacent in that order (then they cannot be one BLAS dimension)."""
  if not letters:
    return 1, 0
  position = [term.index(c) for c in letters]
  if position != list(range(position[0], position[0] + len(letters))):
    return None
  return int(np.prod([shape[p] for p in position], dtype=np.int64)), \
      _strides(shape)[position[-1]]


def _matrix(rows, cols):
  """(transposed, leading dimension) of a strided rows x cols matrix, or None."""
  (r, sr), (c, sc) = rows, cols
  if c == 1 or sc == 1:
    return False, sr if r > 1 else max(c, 1)
  if r == 1 or sr == 1:
    return True, sc if c > 1 else max(r, 1)
  return None


def _geometry(spec, x_shape, y_shape):
  """The cpu_gemm.cc attribute array for `spec`, plus the out shape; None where
  the operands cannot be read in place (callers then use jnp.einsum)."""
  x, y, out, batch, m, n, k = _parse(spec)
  if len(x) != len(x_shape) or len(y) != len(y_shape) or any(
      x_shape[x.index(c)] != y_shape[y.index(c)] for c in set(x) & set(y)):
    raise ValueError(f"einsum {spec!r}: operand shapes {tuple(x_shape)} and "
                     f"{tuple(y_shape)} do not fit")
  if 0 in x_shape or 0 in y_shape:
    return None
  size = dict(zip(x, x_shape)) | dict(zip(y, y_shape))
  out_shape = tuple(size[c] for c in out)
  groups = {}
  for name, term, shape in (("x", x, x_shape), ("y", y, y_shape), ("out", out, out_shape)):
    for dim, letters in (("m", m), ("n", n), ("k", k)):
      if all(c in term for c in letters):
        groups[name, dim] = _group(term, shape, letters)
    strides = dict(zip(term, _strides(shape)))
    groups[name, "batch"] = [strides[c] for c in batch]
  if any(v is None for v in groups.values()) or len(batch) > 2:
    return None
  a = _matrix(groups["x", "m"], groups["x", "k"])
  b = _matrix(groups["y", "k"], groups["y", "n"])
  c = _matrix(groups["out", "m"], groups["out", "n"])
  if a is None or b is None or c is None:
    return None
  batch_sizes = [size[ch] for ch in batch] + [1] * (2 - len(batch))
  pad = lambda s: s + [0] * (2 - len(s))
  mm, nn, kk = groups["x", "m"][0], groups["y", "n"][0], groups["x", "k"][0]
  stride_x, stride_y, stride_out = (pad(groups[t, "batch"]) for t in ("x", "y", "out"))
  if c[0]:  # C is stored transposed: compute C^T = op(B)^T op(A)^T instead
    a, b, mm, nn = (not b[0], b[1]), (not a[0], a[1]), nn, mm
    stride_x, stride_y = stride_y, stride_x
    operands = ("y", "x")
  else:
    operands = ("x", "y")
  geometry = [int(a[0]), int(b[0]), mm, nn, kk, a[1], b[1], c[1], *batch_sizes,
              *stride_x, *stride_y, *stride_out]
  assert len(geometry) == _FIELDS
  return tuple(int(v) for v in geometry), out_shape, operands


def _gemm(spec, x, y):
  geometry, out_shape, operands = _geometry(spec, x.shape, y.shape)
  first, second = (x, y) if operands == ("x", "y") else (y, x)
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")
  return call(first, second, geometry=np.asarray(geometry, np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blas_einsum(spec, x, y):
  return _gemm(spec, x, y)


def _fwd(spec, x, y):
  return _gemm(spec, x, y), (x, y)


def _bwd(spec, residuals, grad):
  x, y = residuals
  xs, ys, out, *_ = _parse(spec)
  return einsum(f"{out},{ys}->{xs}", grad, y), einsum(f"{xs},{out}->{ys}", x, grad)


_blas_einsum.defvjp(_fwd, _bwd)


def einsum(spec: str, x: jax.Array, y: jax.Array, **kwargs) -> jax.Array:
  """`jnp.einsum(spec, x, y, **kwargs)`, through OpenBLAS where `enabled` and the
  trace is lowered for CPU (then kwargs, e.g. preferred_element_type, are moot:
  float32 in and out). Two operands; each index appears in two or three of the
  terms."""
  plain = lambda a, b: jnp.einsum(spec, a, b, **kwargs)
  if enabled(x, y) and _geometry(spec, x.shape, y.shape) is not None:
    return jax.lax.platform_dependent(x, y, cpu=functools.partial(_blas_einsum, spec),
                                      default=plain)
  return plain(x, y)
