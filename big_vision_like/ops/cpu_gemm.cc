// Float32 (batched, strided) matrix multiply on CPU through OpenBLAS, as an XLA FFI
// custom call. Compiled on first use by big_vision_like/ops/cpu_gemm.py.
//
// Why: XLA's CPU dots run attention's small batched products at 25-90 GFLOP/s
// where OpenBLAS reaches 95-190 (python -m benchmarks.cpu_gemm).
//
// For every batch index (i, j) < (batch[0], batch[1]):
//   C[i, j] (m x n, row stride ldc)  =  op(A[i, j]) (m x k)  @  op(B[i, j]) (k x n)
// where X[i, j] starts at element i * stride_x[0] + j * stride_x[1] of its buffer and
// op() transposes when trans_x is set (the stored matrix is then k x m / n x k).
// The work (batch items, or row blocks of C when there are few items) is spread over
// XLA's own intra-op thread pool with OpenBLAS single-threaded, so the two never
// oversubscribe the cores. The calling thread takes work too and only waits for
// items other threads have already started: it cannot deadlock on a busy pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Attribute layout (one int64 array, so the Python side stays one call).
enum Field {
  kTransA, kTransB, kM, kN, kK, kLda, kLdb, kLdc,
  kBatch0, kBatch1, kStrideA0, kStrideA1, kStrideB0, kStrideB1, kStrideC0, kStrideC1,
  kNumFields
};

struct Work {
  int64_t g[kNumFields];
  const float* a;
  const float* b;
  float* c;
  int64_t splits;       // blocks of C per batch item: of rows, or of columns
  bool split_columns;   // (the longer side of C is split)
  int64_t block;        // rows or columns per block
  int64_t units;        // batch items x splits
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;

  void Run(int64_t unit) const {
    const int64_t item = unit / splits, start = (unit % splits) * block;
    const int64_t i = item / g[kBatch1], j = item % g[kBatch1];
    const float* a_item = a + i * g[kStrideA0] + j * g[kStrideA1];
    const float* b_item = b + i * g[kStrideB0] + j * g[kStrideB1];
    float* c_item = c + i * g[kStrideC0] + j * g[kStrideC1];
    int64_t m = g[kM], n = g[kN];
    if (split_columns) {  // column c of op(B) starts at c (B stored k x n) or c * ldb
      n = std::min(block, n - start);
      b_item += g[kTransB] ? start * g[kLdb] : start;
      c_item += start;
    } else {  // row r of op(A) starts at r * lda (A stored m x k) or at r
      m = std::min(block, m - start);
      a_item += g[kTransA] ? start : start * g[kLda];
      c_item += start * g[kLdc];
    }
    if (m <= 0 || n <= 0) return;
    scipy_cblas_sgemm(CblasRowMajor, g[kTransA] ? CblasTrans : CblasNoTrans,
                      g[kTransB] ? CblasTrans : CblasNoTrans, m, n, g[kK], 1.0f,
                      a_item, g[kLda], b_item, g[kLdb], 0.0f, c_item, g[kLdc]);
  }

  // Takes units until none is left; returns how many it ran.
  void Drain() {
    int64_t ran = 0;
    for (int64_t u; (u = next.fetch_add(1)) < units; ++ran) Run(u);
    if (ran) {
      std::lock_guard<std::mutex> lock(mu);
      done += ran;
      if (done == units) cv.notify_all();
    }
  }
};

// Index of the last element a strided operand touches (must be inside its buffer).
int64_t LastIndex(int64_t batch0, int64_t batch1, int64_t stride0, int64_t stride1,
                  int64_t rows, int64_t cols, int64_t ld) {
  return (batch0 - 1) * stride0 + (batch1 - 1) * stride1 + (rows - 1) * ld + cols - 1;
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, ffi::Span<const int64_t> geometry) {
  if (geometry.size() != kNumFields) {
    return ffi::Error::InvalidArgument("bvl_cpu_gemm: geometry has " +
                                       std::to_string(geometry.size()) + " fields");
  }
  auto work = std::make_shared<Work>();
  std::copy(geometry.begin(), geometry.end(), work->g);
  const int64_t* g = work->g;
  const int64_t items = g[kBatch0] * g[kBatch1];
  if (items == 0 || g[kM] == 0 || g[kN] == 0) return ffi::Error::Success();
  if (g[kK] == 0) {
    return ffi::Error::InvalidArgument("bvl_cpu_gemm: empty contraction");
  }
  const bool ta = g[kTransA], tb = g[kTransB];
  if (LastIndex(g[kBatch0], g[kBatch1], g[kStrideA0], g[kStrideA1], ta ? g[kK] : g[kM],
                ta ? g[kM] : g[kK], g[kLda]) >= static_cast<int64_t>(a.element_count()) ||
      LastIndex(g[kBatch0], g[kBatch1], g[kStrideB0], g[kStrideB1], tb ? g[kN] : g[kK],
                tb ? g[kK] : g[kN], g[kLdb]) >= static_cast<int64_t>(b.element_count()) ||
      LastIndex(g[kBatch0], g[kBatch1], g[kStrideC0], g[kStrideC1], g[kM], g[kN],
                g[kLdc]) >= static_cast<int64_t>(c->element_count())) {
    return ffi::Error::InvalidArgument("bvl_cpu_gemm: geometry reaches outside a buffer");
  }
  work->a = a.typed_data();
  work->b = b.typed_data();
  work->c = c->typed_data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const double flops = 2.0 * items * g[kM] * g[kN] * g[kK];
  // Few batch items: split each along the longer side of C, one block per thread
  // (blocks of >= 64 rows / columns), so every thread has an equal share.
  const int64_t side = std::max(g[kM], g[kN]);
  int64_t splits = 1;
  if (items < 2 * threads) {
    splits = std::min<int64_t>((threads + items - 1) / items, std::max<int64_t>(1, side / 64));
  }
  work->splits = splits;
  work->split_columns = g[kN] > g[kM];
  work->block = (side + splits - 1) / splits;
  work->units = items * splits;
  const int64_t helpers =
      flops < 2e6 ? 0 : std::min<int64_t>(threads, work->units) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done == work->units; });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void BvlCpuGemmInit() { scipy_openblas_set_num_threads(1); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvlCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geometry"));
