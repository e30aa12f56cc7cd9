// y = x @ W.T for an int8 matrix W with a float32 scale per block of 32 values: an XLA custom call for quant.py.
//
//   x      float32 [..., n_in]                        any leading axes: M rows in all
//   q      int8    [1..., ceil(n_out / 16), n_in / 2, 16, 2]   W packed in tiles of 16 rows (below); leading axes of
//                                                     size 1 (what jax.vmap's expand_dims gives unbatched operands)
//   scale  float32 [1..., n_in / 32, n_out]           scale[b, o]: of W[o, 32 b : 32 b + 32]
//   y      float32 [..., n_out]                       y[m, o] = sum_i x[m, i] * W[o, i] * scale[i / 32, o]
//
// Why it exists: decoding a token reads every weight once, so its speed is set by the bytes read, and XLA:CPU has no
// fast int8 matrix-vector product. Widening each int8 weight to float32 costs two instructions per 16 values, which
// kept a kernel that did so at half the memory's speed on 2 cores. Here the products are integer: each block of 32
// values of a row of x is rounded to int16 with a scale of its own (its largest magnitude / 32767: a relative error
// below 2^-16 of the block's largest value, far under the int8 weights' 2^-8), and one VNNI instruction (vpdpwssd;
// vpmaddwd + vpaddd on AVX2) multiplies a pair of x's values into 16 rows of W at once and adds them to 16 int32
// sums. The layout makes that possible: q[t, j, r, k] = W[16 t + r, 2 j + k], so the 16 rows' values at inputs 2j,
// 2j + 1 are 32 contiguous bytes. A block's 16 sums (at most 32 * 32767 * 127 < 2^31) are then scaled in float32 by
// the 16 rows' weight scales and the block's x scale. ~2 instructions per 32 weights: the memory sets the speed.
//
// Written three times, chosen at run time: AVX-512 with VNNI, AVX2 (16 rows as two halves of 8), and plain C++ for
// other CPUs. The tiles are split between the calling thread and helper threads (class Helpers).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sched.h>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;   // rows of W in a tile
constexpr int64_t kBlock = 32;  // values of a row under one scale
constexpr int64_t kAhead = 4096;  // bytes of W prefetched ahead

struct Problem {
  const int16_t* x;    // [m, n_in] x rounded to int16
  const float* xs;     // [m, n_blocks] the scale of each block of x
  const int8_t* q;     // packed W (above)
  const float* scale;  // [n_blocks, n_out]
  float* y;            // [m, n_out]
  int64_t m, n_in, n_out, n_blocks;
};

int32_t pair_of(const int16_t* x) {  // x[0], x[1] as one 32-bit value, for a broadcast
  int32_t v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// A tile: the 16 outputs of tile t for rows m0..m0+MB-1 of x.
template <int MB>
void tile_baseline(const Problem& p, int64_t t, int64_t m0) {
  const int64_t rows = std::min(kTile, p.n_out - t * kTile);
  const int8_t* q = p.q + t * p.n_in * kTile;
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MB; ++m) {
      const int16_t* x = p.x + (m0 + m) * p.n_in;
      float acc = 0.f;
      for (int64_t b = 0; b < p.n_blocks; ++b) {
        int32_t sum = 0;
        for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) sum += x[i] * q[(i / 2) * 2 * kTile + r * 2 + i % 2];
        acc += static_cast<float>(sum) * (p.scale[b * p.n_out + t * kTile + r] * p.xs[(m0 + m) * p.n_blocks + b]);
      }
      p.y[(m0 + m) * p.n_out + t * kTile + r] = acc;
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
template <int MB>
AVX512 void tile_avx512(const Problem& p, int64_t t, int64_t m0) {
  const int64_t o = t * kTile;
  const __mmask16 valid = static_cast<__mmask16>((1u << std::min(kTile, p.n_out - o)) - 1);
  const int8_t* q = p.q + t * p.n_in * kTile;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  constexpr int K = MB >= 4 ? 1 : 4 / MB;  // independent sums a row of x: vpdpwssd's latency is ~5 cycles
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    __m512i sum[MB][K];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < K; ++k) sum[m][k] = _mm512_setzero_si512();
    // ahead of the stream of W, across the 4 KB pages where the hardware's prefetcher stops (~1.2x on 2 cores)
    for (int64_t line = 0; line < kBlock * kTile; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(q + b * kBlock * kTile + kAhead + line), _MM_HINT_T0);
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; i += 2 * K)
      for (int k = 0; k < K; ++k) {
        const __m512i w =
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (i + 2 * k) * kTile)));
        for (int m = 0; m < MB; ++m)
          sum[m][k] = _mm512_dpwssd_epi32(sum[m][k], w, _mm512_set1_epi32(pair_of(p.x + (m0 + m) * p.n_in + i + 2 * k)));
      }
    const __m512 s = _mm512_maskz_loadu_ps(valid, p.scale + b * p.n_out + o);
    for (int m = 0; m < MB; ++m) {
      for (int k = 1; k < K; ++k) sum[m][0] = _mm512_add_epi32(sum[m][0], sum[m][k]);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][0]),
                               _mm512_mul_ps(s, _mm512_set1_ps(p.xs[(m0 + m) * p.n_blocks + b])), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(p.y + (m0 + m) * p.n_out + o, valid, acc[m]);
}

#define AVX2 __attribute__((target("avx2,fma")))
template <int MB>
AVX2 void tile_avx2(const Problem& p, int64_t t, int64_t m0) {
  const int64_t o = t * kTile, rows = std::min(kTile, p.n_out - o);
  const int8_t* q = p.q + t * p.n_in * kTile;
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  alignas(32) float s[kTile] = {};
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    __m256i sum[MB][2];
    for (int m = 0; m < MB; ++m) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; i += 2) {
      const __m128i* wq = reinterpret_cast<const __m128i*>(q + i * kTile);
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wq)), w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wq + 1));
      for (int m = 0; m < MB; ++m) {
        const __m256i xp = _mm256_set1_epi32(pair_of(p.x + (m0 + m) * p.n_in + i));
        sum[m][0] = _mm256_add_epi32(sum[m][0], _mm256_madd_epi16(w0, xp));
        sum[m][1] = _mm256_add_epi32(sum[m][1], _mm256_madd_epi16(w1, xp));
      }
    }
    std::memcpy(s, p.scale + b * p.n_out + o, rows * sizeof(float));
    for (int m = 0; m < MB; ++m)
      for (int h = 0; h < 2; ++h) {
        const __m256 sx = _mm256_mul_ps(_mm256_load_ps(s + 8 * h), _mm256_set1_ps(p.xs[(m0 + m) * p.n_blocks + b]));
        acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][h]), sx, acc[m][h]);
      }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float out[kTile];
    _mm256_store_ps(out, acc[m][0]);
    _mm256_store_ps(out + 8, acc[m][1]);
    std::memcpy(p.y + (m0 + m) * p.n_out + o, out, rows * sizeof(float));
  }
}
#endif

// The loop over the rows of x around a tile: groups of MB (8 on AVX-512, 4 elsewhere), then the rest.
template <template <int> class Tile, int MB>
void tiles(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    int64_t m = 0;
    for (; m + MB <= p.m; m += MB) Tile<MB>::run(p, t, m);
    switch (p.m - m) {  // MB is at most 8
      case 7: Tile<7>::run(p, t, m); break;
      case 6: Tile<6>::run(p, t, m); break;
      case 5: Tile<5>::run(p, t, m); break;
      case 4: Tile<4>::run(p, t, m); break;
      case 3: Tile<3>::run(p, t, m); break;
      case 2: Tile<2>::run(p, t, m); break;
      case 1: Tile<1>::run(p, t, m); break;
    }
  }
}

#define TILE(NAME)                                                                      \
  template <int MB>                                                                     \
  struct NAME##_t {                                                                     \
    static void run(const Problem& p, int64_t t, int64_t m0) { NAME<MB>(p, t, m0); }    \
  };

using TilesFn = void (*)(const Problem&, int64_t, int64_t);
TILE(tile_baseline)

#if defined(__x86_64__)
TILE(tile_avx512)
TILE(tile_avx2)
TilesFn best_tiles() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    return tiles<tile_avx512_t, 8>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tiles<tile_avx2_t, 4>;
  return tiles<tile_baseline_t, 4>;
}
inline void relax() { __builtin_ia32_pause(); }
#else
TilesFn best_tiles() { return tiles<tile_baseline_t, 4>; }
inline void relax() {}
#endif

const TilesFn kTiles = best_tiles();

// x's rows in blocks of 32, each rounded to int16 in units of its largest magnitude / 32767 (scale 0: all zero)
void round_to_int16(const float* x, int64_t m, int64_t n_in, int16_t* x16, float* xs) {
  for (int64_t b = 0; b < m * n_in / kBlock; ++b) {
    const float* v = x + b * kBlock;
    float top = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) top = std::max(top, std::fabs(v[i]));
    xs[b] = top / 32767.f;
    const float inv = top > 0.f ? 32767.f / top : 0.f;
    for (int64_t i = 0; i < kBlock; ++i) x16[b * kBlock + i] = static_cast<int16_t>(std::lrintf(v[i] * inv));
  }
}

// The tiles in parts of kPartTiles, claimed from a shared counter by the caller and by the helper threads. A helper
// that comes after the caller has done every part finds nothing left, and the Job outlives it.
constexpr int64_t kPartTiles = 4;

struct Job {
  Problem p;
  std::vector<int16_t> x16;
  std::vector<float> xs;
  int64_t n_tiles, n_parts;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    int64_t part;
    while ((part = next.fetch_add(1, std::memory_order_relaxed)) < n_parts) {
      kTiles(p, part * kPartTiles, std::min((part + 1) * kPartTiles, n_tiles));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Threads of our own (one fewer than the cores) that take parts of each product. Why not XLA's intra-op pool (the
// FFI's ThreadPool): its threads sleep between tasks, and waking one takes about as long as a product of one layer
// takes (~0.1 ms), so the caller did nearly all the work alone. These spin for a while after each job, as llama.cpp's
// threads do, yielding the core to anything else that wants it, and sleep once decoding stops (kSpin).
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers;  // never destroyed: its threads live as long as the process
    return *helpers;
  }
  bool any() const { return n_threads_ > 0; }
  void post(std::shared_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = std::move(job);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
  }

 private:
  static constexpr std::chrono::milliseconds kSpin{2};

  Helpers() : n_threads_(static_cast<int>(std::thread::hardware_concurrency()) - 1) {
    for (int i = 0; i < n_threads_; ++i) std::thread([this] { run(); }).detach();
  }

  void run() {
    uint64_t seen = 0;
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins % 64 == 63) sched_yield();
        if (spins % 1024 == 1023 && std::chrono::steady_clock::now() - idle_since > kSpin) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
        relax();
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->work();
    }
  }

  int n_threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
};

int64_t product(ffi::Span<const int64_t> dims, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t i = from; i < to; ++i) n *= dims[i];
  return n;
}

ffi::Error Int8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || qd.size() < 4 || sd.size() != qd.size() - 2 || yd.size() != xd.size())
    return ffi::Error::InvalidArgument("int8_matmul: x, q, scale and y do not have quant.py's ranks");
  const int64_t n_in = xd.back(), n_out = yd.back(), n_blocks = sd[sd.size() - 2], n_tiles = qd[qd.size() - 4];
  if (qd[qd.size() - 3] * 2 != n_in || qd[qd.size() - 2] != kTile || qd.back() != 2 || sd.back() != n_out ||
      n_blocks * kBlock != n_in || n_tiles != (n_out + kTile - 1) / kTile || product(qd, 0, qd.size() - 4) != 1 ||
      product(sd, 0, sd.size() - 2) != 1)
    return ffi::Error::InvalidArgument("int8_matmul: the shapes of x, q, scale and y do not agree");
  const int64_t m = product(xd, 0, xd.size() - 1);
  if (product(yd, 0, yd.size() - 1) != m) return ffi::Error::InvalidArgument("int8_matmul: y must be [..., n_out]");
  if (m == 0 || n_out == 0) return ffi::Error::Success();

  auto job = std::make_shared<Job>();
  job->x16.resize(m * n_in);
  job->xs.resize(m * n_blocks);
  round_to_int16(x.typed_data(), m, n_in, job->x16.data(), job->xs.data());
  job->p = {job->x16.data(), job->xs.data(), q.typed_data(), scale.typed_data(), y->typed_data(), m, n_in, n_out,
            n_blocks};
  job->n_tiles = n_tiles;
  job->n_parts = (n_tiles + kPartTiles - 1) / kPartTiles;
  if (job->n_parts > 1 && Helpers::get().any()) Helpers::get().post(job);
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->n_parts) relax();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(gptjax_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
