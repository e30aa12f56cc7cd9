// y = x @ W.T for an int8 matrix W with a float32 scale per block of its rows: an XLA custom call for quant.py.
//
//   x      float32 [..., n_in]          any leading axes: M rows in all
//   q      int8    [1..., n_out, n_in]  leading axes of size 1 (what jax.vmap's expand_dims gives unbatched operands)
//   scale  float32 [1..., n_out, n_in / block]
//   y      float32 [..., n_out]         y[m, o] = sum_i x[m, i] * q[o, i] * scale[o, i / block]
//
// Why it exists: decoding a token reads every weight once, so its speed is set by the bytes read, and XLA:CPU turns an
// int8 weight converted inside a dot into a loop ~8x slower than its float32 matrix-vector product. Here each weight
// is read once, widened to float32 in registers, scaled by its block's scale and multiplied into up to 4 rows of x
// at a time; 4 rows of W are read together so that each load of x serves 4 outputs. Activations stay float32.
// The loop is written once with GCC's vector extensions and compiled three times: AVX-512, AVX2 with FMA, and
// baseline x86-64 (or whatever the target is); the widest the CPU supports is chosen at run time. The rows of W are
// split among XLA's intra-op threads and the calling thread.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t m, n_in, n_out, n_blocks, block;
};

// A tile: outputs o..o+R-1 for the rows m0..m0+MB-1 of x. Each value of W is read once, widened to float32 and
// scaled by its block's scale, then multiplied into MB rows of x; each load of x serves R rows of W. One version per
// instruction set, chosen at run time (kTile below); the loops around them are shared.
template <int R, int MB>
void tile_baseline(const Problem& p, int64_t o, int64_t m0) {
  float acc[R][MB] = {};
  for (int64_t i = 0; i < p.n_in; ++i)
    for (int r = 0; r < R; ++r) {
      const float w = p.q[(o + r) * p.n_in + i] * p.scale[(o + r) * p.n_blocks + i / p.block];
      for (int m = 0; m < MB; ++m) acc[r][m] += w * p.x[(m0 + m) * p.n_in + i];
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.n_out + o + r] = acc[r][m];
}

#if defined(__x86_64__)
#include <immintrin.h>

template <int R, int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void tile_avx512(const Problem& p, int64_t o,
                                                                                    int64_t m0) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    __m512 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(p.scale[(o + r) * p.n_blocks + b]);
    for (int64_t i = b * p.block; i < (b + 1) * p.block; i += 16) {
      __m512 x[MB];
      for (int m = 0; m < MB; ++m) x[m] = _mm512_loadu_ps(p.x + (m0 + m) * p.n_in + i);
      for (int r = 0; r < R; ++r) {
        const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + (o + r) * p.n_in + i));
        const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), s[r]);
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(w, x[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.n_out + o + r] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx2,fma"))) inline float sum_lanes(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

template <int R, int MB>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t o, int64_t m0) {
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    __m256 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm256_set1_ps(p.scale[(o + r) * p.n_blocks + b]);
    for (int64_t i = b * p.block; i < (b + 1) * p.block; i += 8) {
      __m256 x[MB];
      for (int m = 0; m < MB; ++m) x[m] = _mm256_loadu_ps(p.x + (m0 + m) * p.n_in + i);
      for (int r = 0; r < R; ++r) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.q + (o + r) * p.n_in + i));
        const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s[r]);
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(w, x[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.n_out + o + r] = sum_lanes(acc[r][m]);
}
#endif

// The loops around a tile: R = 4 rows of W at a time (1 for the last few), MB = 4 rows of x (fewer for the last).
template <template <int, int> class Tile>
struct Loops {
  template <int R>
  static void rows_of_w(const Problem& p, int64_t o) {
    int64_t m = 0;
    for (; m + 4 <= p.m; m += 4) Tile<R, 4>::run(p, o, m);
    switch (p.m - m) {
      case 3: Tile<R, 3>::run(p, o, m); break;
      case 2: Tile<R, 2>::run(p, o, m); break;
      case 1: Tile<R, 1>::run(p, o, m); break;
    }
  }
  static void outputs(const Problem& p, int64_t begin, int64_t end) {
    int64_t o = begin;
    for (; o + 4 <= end; o += 4) rows_of_w<4>(p, o);
    for (; o < end; ++o) rows_of_w<1>(p, o);
  }
};

#define TILE(NAME)                                                                                 \
  template <int R, int MB>                                                                         \
  struct NAME##_t {                                                                                \
    static void run(const Problem& p, int64_t o, int64_t m0) { NAME<R, MB>(p, o, m0); }            \
  };
TILE(tile_baseline)

using OutputsFn = void (*)(const Problem&, int64_t, int64_t);
struct Isa {
  OutputsFn outputs;
  int64_t lanes;  // a block's length must be a multiple of this
};

#if defined(__x86_64__)
TILE(tile_avx512)
TILE(tile_avx2)
Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return {Loops<tile_avx512_t>::outputs, 16};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {Loops<tile_avx2_t>::outputs, 8};
  return {Loops<tile_baseline_t>::outputs, 1};
}
inline void relax() { __builtin_ia32_pause(); }
#else
Isa best_isa() { return {Loops<tile_baseline_t>::outputs, 1}; }
inline void relax() {}
#endif

const Isa kIsa = best_isa();

// The rows of W in parts of kPartRows, claimed from a shared counter by the caller and by helpers on XLA's pool. A
// helper that starts after the caller has done every part finds nothing left, and the Job outlives it.
constexpr int64_t kPartRows = 64;

struct Job {
  Problem p;
  int64_t n_parts;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    int64_t part;
    while ((part = next.fetch_add(1, std::memory_order_relaxed)) < n_parts) {
      const int64_t begin = part * kPartRows;
      kIsa.outputs(p, begin, std::min(begin + kPartRows, p.n_out));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

int64_t product(ffi::Span<const int64_t> dims, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t i = from; i < to; ++i) n *= dims[i];
  return n;
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() < 1 || qd.size() < 2 || sd.size() != qd.size())
    return ffi::Error::InvalidArgument("int8_matmul: x must be [..., n_in], q [n_out, n_in], scale [n_out, n_blocks]");
  const int64_t n_in = xd.back(), n_out = qd[qd.size() - 2], n_blocks = sd.back();
  if (qd.back() != n_in || sd[sd.size() - 2] != n_out || product(qd, 0, qd.size() - 2) != 1 ||
      product(sd, 0, sd.size() - 2) != 1 || n_blocks < 1 || n_in % n_blocks != 0 || (n_in / n_blocks) % kIsa.lanes != 0)
    return ffi::Error::InvalidArgument("int8_matmul: shapes do not agree (or a block is not a multiple of the vector width)");
  const int64_t m = product(xd, 0, xd.size() - 1);
  if (static_cast<int64_t>(y->element_count()) != m * n_out)
    return ffi::Error::InvalidArgument("int8_matmul: the result must be [..., n_out]");
  if (m == 0 || n_out == 0) return ffi::Error::Success();

  auto job = std::make_shared<Job>();
  job->p = {x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), m, n_in, n_out, n_blocks,
            n_in / n_blocks};
  job->n_parts = (n_out + kPartRows - 1) / kPartRows;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->n_parts) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->n_parts) relax();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gptjax_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
