// Row products for row-stable decode (jaxllm/model/ops.py, row_stable): out [M, O] = x [M, I] . w [O, I]^T, each
// of the M rows summed by the same code in the same order whatever M is, so that a speculative verify step's
// positions get the bits a one-token step gets. One pass over w: each weight row is read from memory once (and
// converted to f32 once, for bf16 and int8) and then dotted with every row of x from the cache. The output rows
// are split over XLA's intra-op thread pool; two weight rows are summed at a time.
//
// w is f32, bf16 or int8. For int8, out = ((x / in_scale) . values) * scale[o] (weights.Int8).
// Built on first use by jaxllm/model/ops.py (_build_row_kernel) with the machine's C++ compiler.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// The 16 lanes of c summed as a tree: 8 + 8, 4 + 4, 2 + 2, 1 + 1.
inline float Lanes(f32x16 c) {
  f32x8 c8 = __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 c4 = __builtin_shufflevector(c8, c8, 0, 1, 2, 3) + __builtin_shufflevector(c8, c8, 4, 5, 6, 7);
  return (c4[0] + c4[2]) + (c4[1] + c4[3]);
}

// out[k] = Lanes(v[k]) for k < 8, bit for bit, with the eight trees run side by side: each level adds the same lane
// pairs as Lanes does, of two vectors packed into one (8 + 8 of v[0] and v[1] in one add, and so on).
inline void Lanes8(const f32x16* v, float* out) {
  f32x16 p[4], q[2];
  for (int k = 0; k < 4; ++k)  // p[k] lanes 0-7: v[2k]'s c8, lanes 8-15: v[2k + 1]'s
    p[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)  // q[k] lanes 4j-4j+3: v[4k + j]'s c4
    q[k] = __builtin_shufflevector(p[2 * k], p[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(p[2 * k], p[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // r lanes 2j, 2j + 1: v[j]'s c4[0] + c4[2] and c4[1] + c4[3]
  f32x16 r = __builtin_shufflevector(q[0], q[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
             __builtin_shufflevector(q[0], q[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  f32x8 s = __builtin_shufflevector(r, r, 0, 2, 4, 6, 8, 10, 12, 14) +
            __builtin_shufflevector(r, r, 1, 3, 5, 7, 9, 11, 13, 15);
  std::memcpy(out, &s, 32);
}

// out[c][r] = the sum of x[r][i] * w[c][i], for R rows of x and C weight rows at once (each chunk of x loaded once
// for the C weight rows, each chunk of w once for the R rows). Each sum has its own two 16-lane accumulators over
// 32-element steps, added lane-wise, its lanes summed by the tree of Lanes (Lanes8 for several sums at once), then
// the tail: the same operations in the same order for every R and C, so a row's result does not depend on how many
// rows share the call (tests/test_speculation.py checks it for every R against one row at a time).
template <int R, int C>
void Dot(const float* const* x, const float* const* w, int64_t n, float (*out)[4]) {
  static_assert(R * C <= 8);
  f32x16 a[C][R] = {}, b[C][R] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int r = 0; r < R; ++r) {
      f32x16 x0, x1;
      std::memcpy(&x0, x[r] + i, 64), std::memcpy(&x1, x[r] + i + 16, 64);
      for (int c = 0; c < C; ++c) {
        f32x16 w0, w1;
        std::memcpy(&w0, w[c] + i, 64), std::memcpy(&w1, w[c] + i + 16, 64);
        a[c][r] += x0 * w0;
        b[c][r] += x1 * w1;
      }
    }
  }
  if constexpr (R * C == 1) {
    out[0][0] = Lanes(a[0][0] + b[0][0]);
  } else {
    f32x16 v[8] = {};
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) v[c * R + r] = a[c][r] + b[c][r];
    float sums[8];
    Lanes8(v, sums);
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) out[c][r] = sums[c * R + r];
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r)
      for (int64_t j = i; j < n; ++j) out[c][r] = std::fma(x[r][j], w[c][j], out[c][r]);  // one rounding each
}

// Every row of x against C weight rows, four rows of x at a time.
template <int C>
void DotRows(const float* xs, int64_t M, const float* const* w, int64_t n, float (*out)[4], float* dest,
             int64_t O, const float* scale) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* x[4];
    int R = int(std::min<int64_t>(4, M - m));
    for (int r = 0; r < R; ++r) x[r] = xs + (m + r) * n;
    switch (R) {
      case 4: Dot<4, C>(x, w, n, out); break;
      case 3: Dot<3, C>(x, w, n, out); break;
      case 2: Dot<2, C>(x, w, n, out); break;
      default: Dot<1, C>(x, w, n, out);
    }
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) dest[(m + r) * O + c] = scale ? out[c][r] * scale[c] : out[c][r];
  }
}

struct Job {
  const float* x;      // [M, I], for int8 already divided by in_scale
  const void* w;       // [O, I]
  const float* scale;  // [O] for int8, else null
  float* out;          // [M, O]
  int64_t M, O, I;
  ffi::DataType type;
};

// w's row o as f32: in place for f32, converted into `row` for bf16 and int8.
const float* WeightRow(const Job& job, int64_t o, float* row) {
  const int64_t I = job.I;
  if (job.type == ffi::DataType::F32) return static_cast<const float*>(job.w) + o * I;
  int64_t i = 0;
  if (job.type == ffi::DataType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(job.w) + o * I;
    for (; i + 16 <= I; i += 16) {
      u16x16 h;
      std::memcpy(&h, src + i, 32);
      u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
      std::memcpy(row + i, &bits, 64);
    }
    for (; i < I; ++i) {
      uint32_t bits = uint32_t(src[i]) << 16;
      std::memcpy(row + i, &bits, 4);
    }
  } else {
    const int8_t* src = static_cast<const int8_t*>(job.w) + o * I;
#if defined(__AVX512F__)  // GCC's generic int8 -> int32 vector convert goes element by element
    for (; i + 16 <= I; i += 16)
      _mm512_storeu_ps(row + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + i)))));
#elif defined(__AVX2__)
    for (; i + 8 <= I; i += 8)
      _mm256_storeu_ps(row + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + i)))));
#endif
    for (; i < I; ++i) row[i] = float(src[i]);
  }
  return row;
}

void RunRows(const Job& job, int64_t begin, int64_t end) {
  std::vector<float> rows(2 * job.I);
  float sums[2][4];
  const int64_t row_bytes = job.I * (job.type == ffi::DataType::F32 ? 4 : job.type == ffi::DataType::BF16 ? 2 : 1);
  for (int64_t o = begin, C; o < end; o += C) {
    C = job.M == 1 ? 1 : int(std::min<int64_t>(2, end - o));
    for (int64_t c = 0; c < C * row_bytes && o + C < end; c += 64)  // the next weight rows on their way
      __builtin_prefetch(static_cast<const char*>(job.w) + (o + C) * row_bytes + c);
    const float* w[2];
    for (int c = 0; c < C; ++c) w[c] = WeightRow(job, o + c, rows.data() + c * job.I);
    const float* scale = job.scale ? job.scale + o : nullptr;
    if (C == 2)
      DotRows<2>(job.x, job.M, w, job.I, sums, job.out + o, job.O, scale);
    else
      DotRows<1>(job.x, job.M, w, job.I, sums, job.out + o, job.O, scale);
  }
}

ffi::Future RowProducts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> in_scale,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto dims = x.dimensions();
  auto wdims = w.dimensions();
  auto job = std::make_shared<Job>();
  job->M = dims[0], job->I = dims[1], job->O = wdims[0];
  job->type = w.element_type();
  job->w = w.untyped_data();
  job->out = out->typed_data();
  job->x = x.typed_data();
  job->scale = nullptr;
  std::shared_ptr<std::vector<float>> scaled;
  if (job->type == ffi::DataType::S8) {
    scaled = std::make_shared<std::vector<float>>(job->M * job->I);
    const float* d = in_scale.typed_data();
    for (int64_t m = 0; m < job->M; ++m)
      for (int64_t i = 0; i < job->I; ++i) (*scaled)[m * job->I + i] = job->x[m * job->I + i] / d[i];
    job->x = scaled->data();
    job->scale = scale.typed_data();
  }
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), job->O / 256));
  ffi::CountDownPromise done(parts);
  ffi::Future future(done);
  int64_t step = (job->O + parts - 1) / parts;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t begin = p * step, end = std::min(job->O, begin + step);
    pool.Schedule([job, scaled, done, begin, end]() mutable {
      RunRows(*job, begin, end);
      done.CountDown();
    });
  }
  RunRows(*job, 0, std::min(job->O, step));
  done.CountDown();
  return future;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmRowProducts, RowProducts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
