// The native CPU kernels of gemma_keras: the matrix-vector products of
// decoding on an x86-64 CPU with AVX2 and FMA, built by gemma_keras/native.py
// into one library per backend. Entry points and their call signatures:
//
//   bfloat16 (and float32) kernel, x float32/bfloat16 (see below):
//     XLA FFI `gemma_bf16_linear_ffi`(x f32 [rows, n_in], kernel bf16|f32 [n_out, n_in])
//       -> f32 [rows, n_out]
//     TensorFlow `GemmaBf16Linear`(x bf16 [..., n_in], kernel bf16|f32) -> bf16 [..., n_out]
//     torch `gemma_keras::bf16_linear`(x, kernel, int threads) -> x's dtype
//   int8 kernel (gemma_keras/quantization.py: w = q * scale, groups of a multiple of 16):
//     XLA FFI `gemma_int8_linear_ffi`(x f32 [..., n_in], kernel s8 [n_out, n_in],
//       scale f32 [n_out, n_in / group]) -> f32 [..., n_out]
//     TensorFlow `GemmaInt8Linear`(x float, kernel int8, scale float) -> float
//     torch `gemma_keras::int8_linear`(x f32, kernel int8, scale f32, int threads) -> f32
//   int4 kernel (w = q * scale + offset, q packed two to a byte per block of 32
//   inputs, groups of a multiple of 32):
//     XLA FFI `gemma_int4_linear_ffi`(x f32 [..., n_in], kernel u8 [n_out, n_in / 2],
//       scale f32 [n_out, n_in / group], offset f32 [n_out, n_in / group]) -> f32 [..., n_out]
//     TensorFlow `GemmaInt4Linear`(x float, kernel uint8, scale float, offset float) -> float
//     torch `gemma_keras::int4_linear`(x f32, kernel uint8, scale f32, offset f32,
//       int threads) -> f32
//   ctypes: `gemma_quantized_linear` (int8 and int4; see its comment),
//     `gemma_bf16_linear_supported`, `gemma_cpu_has_bfloat16_dot`,
//     `gemma_quantized_linear_isa`.
// XLA FFI handlers are compiled where GEMMA_KERAS_XLA_FFI is defined (against
// jaxlib's headers), TensorFlow operations where GEMMA_KERAS_TF_OP is
// (against TensorFlow's), torch operators where GEMMA_KERAS_TORCH_OP is
// (against torch's). Each runs on its framework's intra-op threads; ctypes'
// calls run on threads of the library's own. The int8 and int4 loops take
// AVX512-VNNI where the CPU has it (with x quantized to int8; see namespace
// vnni), else AVX512, else AVX2.
//
// ---------------------------------------------------------------------------
// The bfloat16 kernel.
//
// out = x @ kernel.T in bfloat16 precision, with float32 x and float32 out:
// the matrix-vector products of bfloat16 decoding on an x86-64 CPU with AVX2.
// The kernel is held in bfloat16, or in float32 (Keras' mixed_bfloat16 policy,
// whose layers cast each float32 weight to bfloat16 before multiplying): then
// each value is rounded to bfloat16 as it is read, as that cast rounds it, and
// the result is the one of the bfloat16 kernel the cast would have written.
// On torch it also multiplies float32 x by a float32 kernel as it is, where
// it reads faster than torch's own float32 product (see the torch operator).
//
// Why it exists: decoding reads every weight once per token, so its speed is
// the rate at which the kernel streams from memory. XLA's CPU backend has no
// bfloat16 dot (it reads bfloat16 at 8-12 GB/s through YNNPACK or writes a
// float32 copy), and torch's bfloat16 product on a CPU without AVX512 read
// 9-10 GB/s, on a CPU whose float32 product reads 20-35 GB/s (with
// AVX512-BF16 it reads 17 GB/s of a row where this kernel reads 33). Widening
// bfloat16 to float32 is a 16-bit shift, so a plain loop of shifts and fused
// multiply-adds reads the kernel at close to the memory's speed. A float32
// kernel cast to bfloat16 on every step instead writes a new bfloat16 copy
// of every weight per token (the 270M on JAX: 2.8 against 50 tokens/s).
//
// Layout: kernel [n_out, n_in] (bfloat16 bits or float32), x [rows, n_in],
// out [rows, n_out]; n_in is a multiple of 16. Sums run in float32, 8 lanes
// each, and the caller rounds `out` to bfloat16 (unless x is float32). Built by
// gemma_keras/native.py, with one entry point per backend:
// `gemma_bf16_linear_ffi`, an XLA FFI handler for JAX (compiled where
// GEMMA_KERAS_XLA_FFI is defined, against jaxlib's headers), the TensorFlow
// operation `GemmaBf16Linear` (where GEMMA_KERAS_TF_OP is defined, against
// TensorFlow's), and the torch operator `gemma_keras::bf16_linear`
// (GEMMA_KERAS_TORCH_OP, against torch's).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef GEMMA_KERAS_XLA_FFI
#include "xla/ffi/api/ffi.h"
#endif
#ifdef GEMMA_KERAS_TF_OP
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#endif
#ifdef GEMMA_KERAS_TORCH_OP
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#endif

namespace {

// How far ahead of its reads each kernel row stream asks for memory, in
// bytes (8 cache lines). The hardware prefetchers stop at each 4 KB page;
// asking ahead carries a stream across pages (1 GB bfloat16 kernel, 2
// threads, medians of 12 alternating rounds: 13.2 and 14.9 GB/s against 10.6
// and 12.9 without; 256 to 768 bytes ahead read alike).
constexpr int64_t kPrefetchBytes = 512;

// A quantized kernel row's scales (and int4's offsets) live in arrays of
// their own, streams beside the kernel's that the hardware prefetchers
// follow poorly: the VNNI loops ask for them this many rows ahead (the 2B's
// 16384x2048 int4 products on an Intel Xeon, 2 threads: 29.5-30.5 GB/s
// asking 1 to 8 rows ahead against 28.1 without).
constexpr int64_t kScaleRowsAhead = 4;

// Asks for the `count` floats at `values` (a row's scales or offsets).
inline void prefetch_floats(const float* values, int64_t count) {
  for (int64_t k = 0; k < count; k += 16) _mm_prefetch(reinterpret_cast<const char*>(values + k), _MM_HINT_T0);
}

// A product's kernel rows are cut into shares, claimed by whichever thread
// is free: a thread that starts late (woken from sleep) or runs slow leaves
// its shares to the others. Each share takes kShareOfRest of the rows left
// divided among the threads (at least kMinShareBytes): the first shares are
// long streams, which read fastest (two shares per thread read 5-10% faster
// than 8; docs/performance.md), and the last are short, so that a thread
// done early waits little for the other (the 2B's int4 and int8 decode steps
// on PyTorch 2.5 ms faster than with two equal shares per thread).
// kSpin: how long a thread with nothing to do keeps checking for work before
// it sleeps, since waking a sleeping thread is slow on a VM and a decode step
// starts its next product well within 2 ms (the 2B's 127 products of one
// decode step: 259 against 233 ms with 2 ms of spinning).
constexpr double kShareOfRest = 0.8;
constexpr int64_t kMinShareBytes = int64_t(64) << 10;
constexpr auto kSpin = std::chrono::milliseconds(2);

// Whether `done()` became true within kSpin, checking without sleeping.
template <typename Done>
bool spin_until(Done done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    _mm_pause();
  }
  return true;
}

// How the kernel holds its values, and how they are multiplied.
enum class Kind {
  kBfloat16,         // bfloat16 bits
  kFloat32Rounded,   // float32 values, multiplied as their bfloat16 cast (mixed_bfloat16)
  kFloat32,          // float32 values, multiplied as they are (float32 decoding on torch)
};

template <Kind K>
using Weight = std::conditional_t<K == Kind::kBfloat16, uint16_t, float>;

struct Problem {
  const void* kernel;  // Weight<K> values
  const float* x;      // x with each 16-wide block in the order `widen` reads the
                       // kernel's (see `slot_column`)
  float* out;
  int64_t rows, n_out, n_in;
};

// 16 bfloat16 values, packed in order, as two float32 vectors: the even
// columns (the low half of each 32-bit lane, shifted up) and the odd ones
// (the high half, masked).
inline void widen_bfloat16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u))));
}

// 8 float32 values rounded to bfloat16 (to nearest, ties to even, as a cast
// rounds them): float32 bits with the low 16 bits zero. A NaN becomes a NaN
// with every bit set, where the rounding's carry could turn it into an
// infinity or a zero.
inline __m256 bfloat16_rounded(const float* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lowest_kept));
  const __m256 value = _mm256_castsi256_ps(bits);
  rounded = _mm256_or_si256(rounded, _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q)));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(int32_t(0xffff0000u))));
}

// 16 float32 values rounded to bfloat16, split into even and odd columns as
// the bfloat16 kernel's are, but with the lanes in kFloat32Lanes' order:
// in-lane shuffles cost less than putting them in column order, and the
// rounding leaves a core little time to spare between reads (a 768 KB kernel
// read from cache on one core, medians of 5: 21.2 GB/s against 17.5 with a
// pack and a cross-lane permute). `block` puts the sums' lanes back in the
// bfloat16 kernel's order before adding them, so a float32 kernel gives the
// bits its bfloat16 cast gives.
constexpr int kFloat32Lanes[8] = {0, 1, 4, 5, 2, 3, 6, 7};  // column pair of each lane

inline void widen_rounded(const float* p, __m256& even, __m256& odd) {
  const __m256 low = bfloat16_rounded(p), high = bfloat16_rounded(p + 8);
  even = _mm256_shuffle_ps(low, high, 0x88);  // columns 0 2 8 10 | 4 6 12 14
  odd = _mm256_shuffle_ps(low, high, 0xDD);   // columns 1 3 9 11 | 5 7 13 15
}

// 16 kernel values as two float32 vectors, `first` and `second`.
template <Kind K>
inline void widen(const Weight<K>* p, __m256& first, __m256& second) {
  if constexpr (K == Kind::kBfloat16) {
    widen_bfloat16(p, first, second);
  } else if constexpr (K == Kind::kFloat32Rounded) {
    widen_rounded(p, first, second);
  } else {  // columns 0-7 and 8-15, as they are
    first = _mm256_loadu_ps(p);
    second = _mm256_loadu_ps(p + 8);
  }
}

// The column of a 16-wide block that `widen` puts in each of its 16 slots
// (slots 0-7: the first vector's lanes, 8-15: the second's); x is blocked the
// same way.
inline int64_t slot_column(Kind kind, int64_t slot) {
  const int64_t lane = slot % 8, second = slot / 8;
  switch (kind) {
    case Kind::kBfloat16: return 2 * lane + second;
    case Kind::kFloat32Rounded: return 2 * kFloat32Lanes[lane] + second;
    case Kind::kFloat32: return slot;
  }
  return slot;
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Kernel rows o[0..R) against M rows of x from x row `r`. R * M
// accumulators stay in registers; each kernel value is read once.
template <Kind K, int R, int M>
void block(const Problem& p, const int64_t (&o)[R], int64_t r) {
  const Weight<K>* kernel = static_cast<const Weight<K>*>(p.kernel);
  constexpr int64_t ahead = kPrefetchBytes / sizeof(Weight<K>), per_line = 64 / sizeof(Weight<K>);
  __m256 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.n_in; k += 16) {
    __m256 first[R], second[R];
    for (int i = 0; i < R; ++i) {
      const Weight<K>* row = kernel + o[i] * p.n_in + k;
      // Once per 64-byte line; a prefetch past the kernel's end never faults.
      if (k % per_line == 0) _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
      widen<K>(row, first[i], second[i]);
    }
    for (int j = 0; j < M; ++j) {
      const float* x = p.x + (r + j) * p.n_in + k;
      const __m256 x_first = _mm256_loadu_ps(x), x_second = _mm256_loadu_ps(x + 8);
      for (int i = 0; i < R; ++i) {
        acc[i][j] = _mm256_fmadd_ps(first[i], x_first, acc[i][j]);
        acc[i][j] = _mm256_fmadd_ps(second[i], x_second, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      __m256 sums = acc[i][j];
      // kFloat32Lanes swaps the middle two pairs of lanes; so does 0xD8.
      if (K == Kind::kFloat32Rounded)
        sums = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sums), 0xD8));
      p.out[(r + j) * p.n_out + o[i]] = sum_lanes(sums);
    }
}

// Kernel rows o[0..R) against every row of x, 4 x rows at a time: for R = 2,
// 8 accumulators, 4 widened kernel vectors and one x pair fill 14 of the 16
// vector registers (as do 4 accumulators and 8 kernel vectors in block<4, 1>).
template <Kind K, int R>
void x_rows(const Problem& p, const int64_t (&o)[R]) {
  int64_t r = 0;
  for (; r + 4 <= p.rows; r += 4) block<K, R, 4>(p, o, r);
  switch (p.rows - r) {
    case 3: block<K, R, 3>(p, o, r); break;
    case 2: block<K, R, 2>(p, o, r); break;
    case 1: block<K, R, 1>(p, o, r); break;
  }
}

// Calls step(o) with R kernel rows o at a time, one from each R-th part of
// [begin, end); returns where the rows that no step covers begin.
template <int R, typename Step>
int64_t in_streams(int64_t begin, int64_t end, Step step) {
  const int64_t part = (end - begin) / R;
  for (int64_t j = 0; j < part; ++j) {
    int64_t o[R];
    for (int i = 0; i < R; ++i) o[i] = begin + i * part + j;
    step(o);
  }
  return begin + R * part;
}

// Kernel rows [begin, end). Several kernel rows go at once, one from each
// part of the range: the core then reads long sequential streams, which its
// prefetchers keep ahead of, where neighbouring rows are streams that end
// after one row (a 2048-wide row is one 4 KB page). One row of x: four
// streams (1 GB kernel, 2 threads, median of 6 rounds: 17.2 against
// 14.5 GB/s for four neighbouring rows). More rows of x: two, so that each
// x vector loaded serves two kernel rows (16384x2048 kernel, 8 rows of x:
// 10.0-11.0 against 20.9 ms for one kernel row at a time).
template <Kind K>
void run_rows(const Problem& p, int64_t begin, int64_t end) {
  if (p.rows == 1)
    begin = in_streams<4>(begin, end, [&](const int64_t (&o)[4]) { block<K, 4, 1>(p, o, 0); });
  else
    begin = in_streams<2>(begin, end, [&](const int64_t (&o)[2]) { x_rows<K, 2>(p, o); });
  for (int64_t o = begin; o < end; ++o) x_rows<K, 1>(p, {o});
}

// A product cut into `parts()` shares of kernel rows (multiples of 8) for up
// to `threads()` threads; `run(part)` computes one share. The bfloat16 and
// the int8/int4 products share it, and the threads below that run it.
class SharedWork {
 public:
  virtual ~SharedWork() = default;
  int64_t parts() const { return int64_t(bounds_.size()) - 1; }
  int64_t threads() const { return threads_; }
  void run(int64_t part) const { compute_rows(bounds_[part], bounds_[part + 1]); }

 protected:
  // Cuts `n_out` kernel rows, `bytes` in all, into shares (multiples of 8
  // rows) for `threads`.
  void split(int64_t n_out, int64_t bytes, int64_t threads) {
    // Tiny kernels (under 128 KB) are not worth a second thread; the 270M's
    // projections (82-655 KB in int4) are (its quantized decode steps 12-19%
    // faster on JAX and PyTorch; docs/performance.md).
    threads_ = bytes < (int64_t(128) << 10) || threads < 1 ? 1 : threads;
    bounds_ = {0};
    if (threads_ == 1) bounds_.push_back(n_out);
    const int64_t min_rows = std::max<int64_t>(8, kMinShareBytes * n_out / std::max<int64_t>(1, bytes));
    while (bounds_.back() < n_out) {
      const int64_t rest = n_out - bounds_.back();
      const int64_t rows = std::max<int64_t>(min_rows, int64_t(rest * kShareOfRest / threads_));
      bounds_.push_back(std::min(n_out, bounds_.back() + (rows + 7) / 8 * 8));
    }
    threads_ = std::min(threads_, parts());
  }

 private:
  // Kernel rows [begin, end) against every row of x.
  virtual void compute_rows(int64_t begin, int64_t end) const = 0;
  int64_t threads_ = 1;
  std::vector<int64_t> bounds_;  // share s: kernel rows [bounds_[s], bounds_[s + 1])
};

// The bfloat16 (or float32) product, with x reordered for `block`.
class Bf16Product : public SharedWork {
 public:
  Bf16Product(const void* kernel, Kind kind, const float* x, float* out, int64_t rows,
              int64_t n_out, int64_t n_in, int64_t threads)
      : x_blocked_(rows * n_in),
        problem_{kernel, x_blocked_.data(), out, rows, n_out, n_in},
        run_rows_(kind == Kind::kBfloat16         ? run_rows<Kind::kBfloat16>
                  : kind == Kind::kFloat32Rounded ? run_rows<Kind::kFloat32Rounded>
                                                  : run_rows<Kind::kFloat32>) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < n_in; k += 16)
        for (int64_t slot = 0; slot < 16; ++slot)
          x_blocked_[r * n_in + k + slot] = x[r * n_in + k + slot_column(kind, slot)];
    const int64_t bytes = n_out * n_in * (kind == Kind::kBfloat16 ? sizeof(uint16_t) : sizeof(float));
    split(n_out, bytes, threads);
  }

 private:
  void compute_rows(int64_t begin, int64_t end) const override { run_rows_(problem_, begin, end); }
  std::vector<float> x_blocked_;
  Problem problem_;
  void (*run_rows_)(const Problem&, int64_t, int64_t);
};

// A product's shares, claimed by whichever thread is free. A thread pool may
// run tasks late or run several products at once (XLA runs independent ones
// side by side), so no thread may wait for a share still queued behind it:
// every thread, the caller included, claims shares until none is left, and
// the caller then waits only for shares that other threads are running. A
// task that starts after all shares are claimed returns at once, never
// reading the product; it owns a reference to the counters, which outlive
// the call.
struct Shares {
  explicit Shares(int64_t count) : count(count) {}
  const int64_t count;
  std::atomic<int64_t> next{0}, finished{0};
  std::mutex mutex;
  std::condition_variable all_finished;

  // Runs shares until none is left.
  void work(const SharedWork& product) {
    for (int64_t part; (part = next++) < count;) {
      product.run(part);
      if (++finished == count) {
        std::lock_guard<std::mutex> lock(mutex);
        all_finished.notify_all();
      }
    }
  }

  // Waits until every claimed share has finished.
  void wait() {
    if (spin_until([&] { return finished == count; })) return;
    std::unique_lock<std::mutex> lock(mutex);
    all_finished.wait(lock, [&] { return finished == count; });
  }
};

// Runs `product` on the calling thread and on a thread pool's (XLA's or
// TensorFlow's), whose `schedule(task)` runs a task on one of its threads.
template <typename Schedule>
void run_on_pool(const SharedWork& product, Schedule schedule) {
  auto shares = std::make_shared<Shares>(product.parts());
  for (int64_t helper = 1; helper < product.threads(); ++helper)
    schedule([shares, &product] {
      // Reads `product` only after claiming a share, while the caller waits.
      shares->work(product);
    });
  shares->work(product);
  shares->wait();
}

// Helper threads of the library's own, for callers without a thread pool
// (ctypes) and TensorFlow's quantized operations: started on first use,
// asleep between products after kSpin. One product runs at a time; a helper
// that wakes after its product is done finds no share.
class OwnThreads {
 public:
  void run(const SharedWork& product) {
    std::lock_guard<std::mutex> one_at_a_time(calls_);
    auto shares = std::make_shared<Shares>(product.parts());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (; helpers_ + 1 < product.threads(); ++helpers_)
        std::thread([this] { serve(); }).detach();
      shares_ = shares;
      product_ = &product;
      ++generation_;
    }
    wake_.notify_all();
    shares->work(product);
    shares->wait();
  }

 private:
  void serve() {
    for (uint64_t seen = 0;;) {
      std::shared_ptr<Shares> shares;
      const SharedWork* product;
      {
        spin_until([&] { return generation_ != seen; });
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        shares = shares_;
        product = product_;
      }
      shares->work(*product);
    }
  }

  std::mutex calls_, mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Shares> shares_;
  const SharedWork* product_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  int64_t helpers_ = 0;
};

// The library's own helper threads (see OwnThreads). Never freed:
// detached helpers wait on them until the process exits.
OwnThreads& own_threads() {
  static OwnThreads* threads = new OwnThreads;
  return *threads;
}

// ---------------------------------------------------------------------------
// int8 and int4 kernels (gemma_keras/quantization.py's forms). Each group of
// `group` consecutive inputs of a kernel row has a float32 scale (int4: and an
// offset): w = q * scale (+ offset). A group's sum is taken over the integers
// as they are, dot(x, q), and scaled once per group, scale * dot(x, q) +
// offset * sum(x), so no weight is widened past the register it is
// multiplied in. The kernel is read 16 bytes a step: 16 int8 inputs, or one
// int4 block of 32 (byte k: input k low, input 16 + k high), whose two
// nibbles line up with x[k, k + 16) and x[k + 16, k + 32) as they are.

enum class Bits { kInt8, kInt4 };

struct QuantizedProblem {
  Bits bits;
  const uint8_t* kernel;  // int8 [n_out, n_in], or int4 [n_out, n_in / 2]
  const float* scale;     // [n_out, groups]
  const float* offset;    // [n_out, groups], int4 only
  const float* x;         // [rows, n_in]
  const float* x_sums;    // [rows, groups]: each group's x summed, int4 only
  float* out;             // [rows, n_out]
  int64_t rows, n_out, n_in, group;
  // The VNNI loops' x, quantized (see vnni::QuantizedX): int4's int8 values,
  // int8's 16-bit ones, their scales, and each lane's group.
  const int8_t* x_int8 = nullptr;
  const int16_t* x_int16 = nullptr;
  const float* x_scales = nullptr;
  const int32_t* lane_groups = nullptr;
  bool gfni = false;  // the VNNI loop may take GFNI (see vnni::high_nibbles)
  int64_t groups() const { return n_in / group; }
  int64_t row_bytes() const { return bits == Bits::kInt8 ? n_in : n_in / 2; }
};

// Inputs per 16 kernel bytes.
template <Bits B>
constexpr int64_t kStepInputs = B == Bits::kInt8 ? 16 : 32;


// How far ahead of its reads each kernel row stream asks for memory: as the
// bfloat16 kernel's, once per 64-byte line (4 steps).
inline void prefetch_ahead(const uint8_t* row, int64_t byte) {
  if (byte % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + byte + kPrefetchBytes), _MM_HINT_T0);
}

// AVX2: 8 lanes. A step's 16 bytes make `kPieces` vectors of 8 inputs each;
// piece s is read from `bytes + 8 * (s / 2)` (int4) and multiplies x from
// the step's input `piece_input(s)`.
namespace avx2 {

template <Bits B>
constexpr int kPieces = B == Bits::kInt8 ? 2 : 4;

template <Bits B>
constexpr int64_t piece_input(int s) {
  return B == Bits::kInt8 ? 8 * s : 8 * (s / 2) + 16 * (s % 2);  // int4: low, high, low, high
}

template <Bits B>
inline __m256 widen(const uint8_t* bytes, int s) {
  if constexpr (B == Bits::kInt8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * s));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  } else {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * (s / 2)));
    const __m256i wide = _mm256_cvtepu8_epi32(packed);
    const __m256i q = s % 2 ? _mm256_srli_epi32(wide, 4) : _mm256_and_si256(wide, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(q);
  }
}

// The lane sums of a[0..n) * b[0..n): int4's offsets against the x sums of
// their groups, once per kernel row: a term per group in the group loop
// slowed int4 in groups of 32 (512x2048 kernel, one thread, AVX512: 15.6
// against 19.3 G weights/s on one x row, 2.5 against 3.4 on 8).
inline __m256 dot(const float* a, const float* b, int64_t n) {
  __m256 sums = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) sums = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), sums);
  float rest = 0;
  for (; k < n; ++k) rest += a[k] * b[k];
  return _mm256_add_ps(sums, _mm256_zextps128_ps256(_mm_set_ss(rest)));
}

// Several x rows: blocks of 2 kernel rows by 2 x rows keep 4 row sums, 4
// group sums, 2 kernel vectors and an x vector in 11 of the 16 registers.
constexpr int kKernelRows = 2, kXRows = 2;

// Kernel rows o[0..R) against x rows [r, r + M): out = the sums of R * M
// accumulators, each kernel byte read once.
template <Bits B, int R, int M>
void block(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
  const int64_t groups = p.groups();
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = p.kernel + o[i] * p.row_bytes();
  __m256 sums[R][M];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) sums[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 group_sums[R][M];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < M; ++j) group_sums[i][j] = _mm256_setzero_ps();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += kStepInputs<B>) {
      const int64_t byte = B == Bits::kInt8 ? k : k / 2;
      for (int i = 0; i < R; ++i) prefetch_ahead(rows[i], byte);
      for (int s = 0; s < kPieces<B>; ++s) {
        __m256 w[R];
        for (int i = 0; i < R; ++i) w[i] = widen<B>(rows[i] + byte, s);
        for (int j = 0; j < M; ++j) {
          const __m256 x = _mm256_loadu_ps(p.x + (r + j) * p.n_in + k + piece_input<B>(s));
          for (int i = 0; i < R; ++i) group_sums[i][j] = _mm256_fmadd_ps(w[i], x, group_sums[i][j]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m256 scale = _mm256_set1_ps(p.scale[o[i] * groups + g]);
      for (int j = 0; j < M; ++j) sums[i][j] = _mm256_fmadd_ps(scale, group_sums[i][j], sums[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      if constexpr (B == Bits::kInt4)  // + sum over groups of offset * sum(x)
        sums[i][j] = _mm256_add_ps(sums[i][j], dot(p.offset + o[i] * groups, p.x_sums + (r + j) * groups, groups));
      p.out[(r + j) * p.n_out + o[i]] = sum_lanes(sums[i][j]);
    }
}

}  // namespace avx2

// AVX512: 16 lanes, so a step is one vector of int8 inputs, or an int4
// block's low nibbles then its high ones. The same loop as AVX2's.
namespace avx512 {

#define GEMMA_KERAS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

template <Bits B>
constexpr int kPieces = B == Bits::kInt8 ? 1 : 2;

template <Bits B>
GEMMA_KERAS_AVX512 inline __m512 widen(const uint8_t* bytes, int s) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  if constexpr (B == Bits::kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(packed));
  } else {
    // vpermps reads the low 4 bits of each index: a table lookup of q as a
    // float, without masking the low nibble or converting (512x2048 kernel,
    // groups of 32, one thread: 20.2 against 16.8 G weights/s on one x row).
    const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i wide = _mm512_cvtepu8_epi32(packed);
    return _mm512_permutexvar_ps(s ? _mm512_srli_epi32(wide, 4) : wide, values);
  }
}

GEMMA_KERAS_AVX512 inline __m512 dot(const float* a, const float* b, int64_t n) {
  __m512 sums = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 valid = n - k >= 16 ? 0xffff : (1u << (n - k)) - 1;
    sums = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, a + k), _mm512_maskz_loadu_ps(valid, b + k), sums);
  }
  return sums;
}

// Several x rows: blocks of 4 kernel rows by 2 x rows (22 of the 32
// registers), so that each x vector loaded serves 4 kernel rows: x rows
// come from L2 once a few of them outgrow L1 (512x2048 int8 kernel, 8 x
// rows, one thread: 389 us with 2 kernel rows by 4 x rows, 227 us).
constexpr int kKernelRows = 4, kXRows = 2;

template <Bits B, int R, int M>
GEMMA_KERAS_AVX512 void block(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
  const int64_t groups = p.groups();
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = p.kernel + o[i] * p.row_bytes();
  __m512 sums[R][M];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) sums[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 group_sums[R][M];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < M; ++j) group_sums[i][j] = _mm512_setzero_ps();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += kStepInputs<B>) {
      const int64_t byte = B == Bits::kInt8 ? k : k / 2;
      for (int i = 0; i < R; ++i) prefetch_ahead(rows[i], byte);
      for (int s = 0; s < kPieces<B>; ++s) {
        __m512 w[R];
        for (int i = 0; i < R; ++i) w[i] = widen<B>(rows[i] + byte, s);
        for (int j = 0; j < M; ++j) {
          const __m512 x = _mm512_loadu_ps(p.x + (r + j) * p.n_in + k + 16 * s);
          for (int i = 0; i < R; ++i) group_sums[i][j] = _mm512_fmadd_ps(w[i], x, group_sums[i][j]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m512 scale = _mm512_set1_ps(p.scale[o[i] * groups + g]);
      for (int j = 0; j < M; ++j) sums[i][j] = _mm512_fmadd_ps(scale, group_sums[i][j], sums[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      if constexpr (B == Bits::kInt4)
        sums[i][j] = _mm512_add_ps(sums[i][j], dot(p.offset + o[i] * groups, p.x_sums + (r + j) * groups, groups));
      p.out[(r + j) * p.n_out + o[i]] = _mm512_reduce_add_ps(sums[i][j]);
    }
}

}  // namespace avx512

// AVX512-VNNI: the products summed on integers, `vpdpbusd` (bytes, 64
// products per instruction) for int4 and `vpdpwssd` (16-bit, 32) for int8.
// The float loops above spend a shuffle or two per 16 weights widening them,
// and shuffles issue on one port: 20-31 G weights/s per core, below the
// memory's speed for 4-bit weights and barely above it for 8-bit ones.
// - int4: x quantized to int8 in blocks of 32 inputs (scale max|x| / 127,
//   rounded to nearest, as llama.cpp's Q8_0 does for its own int4 products).
//   Each x is off by at most half its block's scale, so an output is off by
//   at most the sum over its inputs of |q * scale| * x_scale / 2; the
//   offsets' share is exact (float x sums).
// - int8: x quantized to 16 bits with one scale per row (max|x| / 32767),
//   each x off by at most max|x| / 65534: less than rounding x to bfloat16
//   moves it (int8 x, in blocks of 64, made 4.9% of the real 270M's greedy
//   decode steps pick another token than float32's; 16-bit x, 0.4%, as the
//   exact product).
namespace vnni {

#define GEMMA_KERAS_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")))

// Inputs per 64 kernel bytes ("a chunk"): 64 int8 ones, or four int4 blocks,
// whose 16 bytes each hold inputs [0, 16) in their low nibbles and [16, 32)
// in their high ones.
template <Bits B>
constexpr int64_t kChunk = B == Bits::kInt8 ? 64 : 128;

template <Bits B>
inline int64_t chunks(int64_t n_in) {
  return (n_in + kChunk<B> - 1) / kChunk<B>;
}

// The first input of each lane of a chunk's sums. int4 (`vpdpbusd` sums 4
// bytes a lane): block lane / 4's (its low nibbles' lane also holds the high
// nibbles' inputs 16 on). int8 (`vpdpwssd`, 2 values a lane, over the
// chunk's two halves in turn): lane l of half h starts at 32 h + 2 l.
template <Bits B>
constexpr int64_t lane_input(int half, int lane) {
  return B == Bits::kInt8 ? 32 * half + 2 * lane : 32 * (lane / 4);
}

// How a kernel row's weight scales vary across a chunk: one per row (`kRow`,
// multiplied in at the end), one per chunk (`kChunk`: groups a multiple of
// the chunk, a broadcast operand), or per lane (`kLane`: gathered per chunk
// through the lanes' groups).
enum class Scales { kRow, kChunk, kLane };

template <Bits B>
inline Scales scales_of(int64_t group, int64_t n_in) {
  return group == n_in ? Scales::kRow : group % kChunk<B> == 0 ? Scales::kChunk : Scales::kLane;
}

// x rows as the loops read them. int4, per row and chunk: the four blocks'
// inputs [0, 16) as int8 (against the low nibbles), then their [16, 32); the
// 16 lanes' scales (lanes 4b..4b+3 block b's). int8: each row's 16-bit
// values, zeros to a whole chunk, and its scale. For kLane only, per chunk
// (and int8 half): each lane's group less the chunk's first group.
// Vectors whose data starts on a 64-byte line, so that no 64-byte load of x
// straddles two (int4's 2048-wide products: 4% faster than std::vector's 16).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

struct QuantizedX {
  AlignedVector<int8_t> values;
  AlignedVector<int16_t> wide_values;
  AlignedVector<float> scales;
  std::vector<int32_t> lane_groups;
};

// 16 values times `inverse`, rounded to the nearest integers.
GEMMA_KERAS_VNNI inline __m512i rounded(const float* x, __m512 inverse) {
  return _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inverse));
}

GEMMA_KERAS_VNNI inline float largest_magnitude(const float* x, int64_t n) {  // n a multiple of 16
  __m512 largest = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  return _mm512_reduce_max_ps(largest);
}

template <Bits B>
GEMMA_KERAS_VNNI QuantizedX quantize_x(const float* x, int64_t rows, int64_t n_in, int64_t group) {
  constexpr int64_t chunk = kChunk<B>;
  constexpr int kHalves = B == Bits::kInt8 ? 2 : 1;
  const int64_t n_chunks = chunks<B>(n_in);
  QuantizedX q;
  if (scales_of<B>(group, n_in) == Scales::kLane) q.lane_groups.resize(n_chunks * kHalves * 16);
  for (int64_t c = 0; c < int64_t(q.lane_groups.size()) / (kHalves * 16); ++c)
    for (int half = 0; half < kHalves; ++half)
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t input = std::min(c * chunk + lane_input<B>(half, lane), n_in - 1);
        q.lane_groups[(c * kHalves + half) * 16 + lane] = int32_t(input / group - c * chunk / group);
      }
  if constexpr (B == Bits::kInt8) {
    q.wide_values.assign(rows * n_chunks * chunk, 0);
    q.scales.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const float top = largest_magnitude(x + r * n_in, n_in);
      const __m512 inverse = _mm512_set1_ps(top > 0 ? 32767.0f / top : 0.0f);
      for (int64_t k = 0; k < n_in; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.wide_values.data() + r * n_chunks * chunk + k),
                            _mm512_cvtsepi32_epi16(rounded(x + r * n_in + k, inverse)));
      q.scales[r] = top / 32767.0f;
    }
  } else {
    q.values.assign(rows * n_chunks * chunk, 0);
    q.scales.resize(rows * n_chunks * 16);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < n_in; k += 32) {
        const int64_t c = r * n_chunks + k / chunk, b = (k % chunk) / 32;
        const float top = largest_magnitude(x + r * n_in + k, 32);
        const __m512 inverse = _mm512_set1_ps(top > 0 ? 127.0f / top : 0.0f);
        int8_t* low = q.values.data() + c * chunk + 16 * b;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(low), _mm512_cvtsepi32_epi8(rounded(x + r * n_in + k, inverse)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(low + 64),
                         _mm512_cvtsepi32_epi8(rounded(x + r * n_in + k + 16, inverse)));
        for (int lane = 0; lane < 4; ++lane) q.scales[c * 16 + 4 * b + lane] = top / 127.0f;
      }
  }
  return q;
}

// One x row: how many kernel row streams a thread reads at once, which
// suits each maker's prefetchers differently. AMD (a Zen 4, all int4
// products of a decode step in turn, 2 threads, alternating;
// docs/performance.md): the 2B's 42-54 ms with 2 streams, 46-61 with 4,
// 57-73 with 8, 55-76 with 1, int8's alike; but an x row wider than
// kNarrowX (int4's int8 values and lane scales, int8's 16-bit values)
// outgrows the 32 KB L1 cache, and there 4 streams share each read of it
// (the 2B's 2048x16384 down projection, int4 13.37 against 15.40 ms).
// Intel (a Xeon with AMX, the same products through ctypes, alternating
// runs): 8 streams read 26.6-26.7 GB/s in int4 against 24.9-25.3 with 2 or
// 4 and 22.7 with 1, int8 30.3-30.7 against 28.2-29.3, and 8 for the wide
// x rows too (27.4-27.6 against 26.7-26.9 with 4).
constexpr int kKernelRows = 4, kXRows = 2;
constexpr int64_t kNarrowX = 8192;

inline int one_row_streams(int64_t n_in) {
  static const bool intel = __builtin_cpu_is("intel");
  return intel ? 8 : n_in > kNarrowX ? 4 : 2;
}

// Instructions per 64 kernel bytes count too (the 2B's int4 step products at
// two streams: 42-55 against 53-59 ms before these), so the loops spend as
// few as the CPU allows, each a template choice (GCC emits GFNI only where
// the intrinsic is; the loop without it runs on CPUs with VNNI but no GFNI):
// - `kGfni`: int4's high nibbles shifted down per byte by one GF(2) affine
//   transform (`gf2p8affineqb`), where a 16-bit shift needs a mask after it;
// - `S`, how the weight scales vary (see `Scales`). int8 sums whole groups
//   on the integers before scaling them, where they are a multiple of the chunk.
#define GEMMA_KERAS_VNNI_GFNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,gfni,avx2,fma")))

// Bits 4-7 of each byte to bits 0-3: result bit i takes source bit i + 4,
// and `gf2p8affineqb` reads result bit i's mask from byte 7 - i.
constexpr long long kHighNibbleDown = 0x1020408000000000LL;

template <bool kGfni>
GEMMA_KERAS_VNNI_GFNI inline __m512i high_nibbles(__m512i packed) {
  if constexpr (kGfni)
    return _mm512_gf2p8affine_epi64_epi8(packed, _mm512_set1_epi64(kHighNibbleDown), 0);
  else
    return _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(15));
}

// A kernel row's weight scales for the 16 lanes `lane_groups` names, whose
// groups are [first, last] (row_scales + first: the first's).
GEMMA_KERAS_VNNI inline __m512 lane_scales(const float* row_scales, const int32_t* lane_groups, int64_t first,
                                           int64_t last) {
  const __mmask16 scales = __mmask16((1u << (last - first + 1)) - 1);
  return _mm512_permutexvar_ps(_mm512_loadu_si512(lane_groups), _mm512_maskz_loadu_ps(scales, row_scales + first));
}

// The groups [first, last] of each chunk of inputs [begin, end) in turn,
// kept without dividing (a division per chunk is slow): kChunk counts
// chunks, kLane compares bounds, kRow has one group.
template <Scales S>
struct ChunkGroups {
  const int64_t group, chunks_per_group;
  int64_t first = 0, last = 0, chunks_into_group = 0;
  ChunkGroups(int64_t group, int64_t chunk) : group(group), chunks_per_group(S == Scales::kChunk ? group / chunk : 1) {}
  void enter(int64_t begin, int64_t end) {
    if constexpr (S == Scales::kChunk) {
      if (begin > 0 && ++chunks_into_group == chunks_per_group) {
        chunks_into_group = 0;
        last = ++first;
      }
    } else if constexpr (S == Scales::kLane) {
      while ((first + 1) * group <= begin) ++first;
      while ((last + 1) * group < end) ++last;
    }
  }
};

template <int R, int M, bool kGfni, Scales S>
GEMMA_KERAS_VNNI_GFNI void block_int4(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
  constexpr int64_t chunk = kChunk<Bits::kInt4>;
  const int64_t groups = p.groups(), row_bytes = p.row_bytes(), n_chunks = chunks<Bits::kInt4>(p.n_in);
  const __m512i nibble = _mm512_set1_epi8(15);
  const uint8_t* rows[R];
  const float* row_scales[R];
  for (int i = 0; i < R; ++i) {
    rows[i] = p.kernel + o[i] * row_bytes;
    row_scales[i] = p.scale + o[i] * groups;
    prefetch_floats(row_scales[i] + kScaleRowsAhead * groups, groups);
    prefetch_floats(p.offset + (o[i] + kScaleRowsAhead) * groups, groups);
  }
  __m512 sums[R][M];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) sums[i][j] = _mm512_setzero_ps();
  const int64_t full_chunks = row_bytes / 64;
  const __mmask64 last_bytes = (1ULL << (row_bytes % 64)) - 1;
  ChunkGroups<S> in(p.group, chunk);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t byte = 64 * c;
    in.enter(c * chunk, std::min(c * chunk + chunk, p.n_in));
    const __mmask64 bytes = c < full_chunks ? ~0ULL : last_bytes;
    __m512i low[R], high[R];
    __m512 scales[R];
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[i] + byte + kPrefetchBytes), _MM_HINT_T0);
      const __m512i packed = _mm512_maskz_loadu_epi8(bytes, rows[i] + byte);
      low[i] = _mm512_and_si512(packed, nibble);
      high[i] = high_nibbles<kGfni>(packed);
      if constexpr (S == Scales::kChunk) scales[i] = _mm512_set1_ps(row_scales[i][in.first]);
      if constexpr (S == Scales::kLane) scales[i] = lane_scales(row_scales[i], p.lane_groups + 16 * c, in.first, in.last);
    }
    for (int j = 0; j < M; ++j) {
      const int64_t at = (r + j) * n_chunks + c;
      const __m512i x_low = _mm512_loadu_si512(p.x_int8 + at * chunk), x_high = _mm512_loadu_si512(p.x_int8 + at * chunk + 64);
      const __m512 x_scales = _mm512_loadu_ps(p.x_scales + at * 16);
      for (int i = 0; i < R; ++i) {
        const __m512i dots =
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), low[i], x_low), high[i], x_high);
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dots), x_scales);
        // (dots * x_scales) * weight_scale, so that a single scale is a broadcast operand.
        sums[i][j] = S == Scales::kRow ? _mm512_add_ps(scaled, sums[i][j]) : _mm512_fmadd_ps(scaled, scales[i], sums[i][j]);
      }
    }
  }
  // The lanes are summed with constant indices before the offsets' loop: indexed
  // there, `sums` lived on the stack and was stored every chunk.
  float totals[R][M];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      totals[i][j] = _mm512_reduce_add_ps(sums[i][j]);
      if constexpr (S == Scales::kRow) totals[i][j] *= p.scale[o[i]];
    }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      const __m512 offsets = avx512::dot(p.offset + o[i] * groups, p.x_sums + (r + j) * groups, groups);
      p.out[(r + j) * p.n_out + o[i]] = totals[i][j] + _mm512_reduce_add_ps(offsets);
    }
}

// Chunks of 16-bit products summed in int32 before they are scaled: each
// lane gains at most 4 * 127 * 32767 < 2^24 a chunk.
constexpr int64_t kInt32Chunks = 128;

// Adds block_int8's integer sums of chunk c, scaled, to its float ones, and
// clears them: lane scales per half (kLane), one scale per chunk, or one per
// row (scaled at the end).
template <int R, int M, Scales S>
GEMMA_KERAS_VNNI inline void scale_sums(const QuantizedProblem& p, const int64_t (&o)[R], int64_t c,
                                        const ChunkGroups<S>& in, __m512 (&sums)[R][M], __m512i (&dots)[R][M][2]) {
  for (int i = 0; i < R; ++i) {
    const float* row_scales = p.scale + o[i] * p.groups();
    for (int j = 0; j < M; ++j) {
      const __m512 first = _mm512_cvtepi32_ps(dots[i][j][0]), second = _mm512_cvtepi32_ps(dots[i][j][1]);
      if constexpr (S == Scales::kLane) {
        const int32_t* lane_groups = p.lane_groups + 32 * c;
        sums[i][j] = _mm512_fmadd_ps(first, lane_scales(row_scales, lane_groups, in.first, in.last), sums[i][j]);
        sums[i][j] = _mm512_fmadd_ps(second, lane_scales(row_scales, lane_groups + 16, in.first, in.last), sums[i][j]);
      } else {
        const __m512 both = _mm512_add_ps(first, second);
        sums[i][j] = S == Scales::kRow ? _mm512_add_ps(both, sums[i][j])
                                       : _mm512_fmadd_ps(both, _mm512_set1_ps(row_scales[in.first]), sums[i][j]);
      }
      dots[i][j][0] = dots[i][j][1] = _mm512_setzero_si512();
    }
  }
}

template <int R, int M, Scales S>
GEMMA_KERAS_VNNI void block_int8(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
  constexpr int64_t chunk = kChunk<Bits::kInt8>;
  const int64_t n_chunks = chunks<Bits::kInt8>(p.n_in);
  const int8_t* rows[R];
  for (int i = 0; i < R; ++i) {
    rows[i] = reinterpret_cast<const int8_t*>(p.kernel) + o[i] * p.n_in;
    prefetch_floats(p.scale + (o[i] + kScaleRowsAhead) * p.groups(), p.groups());
  }
  __m512 sums[R][M];
  __m512i dots[R][M][2];  // per chunk half
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      sums[i][j] = _mm512_setzero_ps();
      dots[i][j][0] = dots[i][j][1] = _mm512_setzero_si512();
    }
  ChunkGroups<S> in(p.group, chunk);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = c * chunk, end = std::min(begin + chunk, p.n_in);
    in.enter(begin, end);
    const __mmask64 bytes = end - begin == 64 ? ~0ULL : (1ULL << (end - begin)) - 1;
    __m512i weights[R][2];
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[i] + begin + kPrefetchBytes), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h)
        weights[i][h] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(__mmask32(bytes >> (32 * h)), rows[i] + begin + 32 * h));
    }
    for (int j = 0; j < M; ++j) {
      const int16_t* x = p.x_int16 + ((r + j) * n_chunks + c) * chunk;
      for (int h = 0; h < 2; ++h) {
        const __m512i x_half = _mm512_loadu_si512(x + 32 * h);
        for (int i = 0; i < R; ++i) dots[i][j][h] = _mm512_dpwssd_epi32(dots[i][j][h], weights[i][h], x_half);
      }
    }
    // Scaled where a group ends (kLane: every chunk), and every kInt32Chunks.
    const bool group_ends = S == Scales::kLane || (S == Scales::kChunk && in.chunks_into_group + 1 == in.chunks_per_group);
    if (group_ends || c + 1 == n_chunks || (c + 1) % kInt32Chunks == 0) scale_sums<R, M, S>(p, o, c, in, sums, dots);
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) {
      float out = _mm512_reduce_add_ps(sums[i][j]) * p.x_scales[r + j];
      if constexpr (S == Scales::kRow) out *= p.scale[o[i]];
      p.out[(r + j) * p.n_out + o[i]] = out;
    }
}

}  // namespace vnni

// One instruction set's blocks: `Isa` is the namespace's tag below.
struct Avx2 {
  static constexpr int kKernelRows = avx2::kKernelRows, kXRows = avx2::kXRows;
  static int one_row_streams(int64_t) { return 4; }
  template <Bits B, int R, int M>
  static void block(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
    avx2::block<B, R, M>(p, o, r);
  }
};
struct Avx512 {
  static constexpr int kKernelRows = avx512::kKernelRows, kXRows = avx512::kXRows;
  static int one_row_streams(int64_t) { return 4; }
  template <Bits B, int R, int M>
  static void block(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
    avx512::block<B, R, M>(p, o, r);
  }
};
struct Avx512Vnni {
  static constexpr int kKernelRows = vnni::kKernelRows, kXRows = vnni::kXRows;
  static int one_row_streams(int64_t n_in) { return vnni::one_row_streams(n_in); }
  template <Bits B, int R, int M>
  static void block(const QuantizedProblem& p, const int64_t (&o)[R], int64_t r) {
    using vnni::Scales;
    const Scales scales = vnni::scales_of<B>(p.group, p.n_in);
    if constexpr (B == Bits::kInt8) {
      if (scales == Scales::kRow) vnni::block_int8<R, M, Scales::kRow>(p, o, r);
      else if (scales == Scales::kChunk) vnni::block_int8<R, M, Scales::kChunk>(p, o, r);
      else vnni::block_int8<R, M, Scales::kLane>(p, o, r);
    } else if (p.gfni) {
      if (scales == Scales::kRow) vnni::block_int4<R, M, true, Scales::kRow>(p, o, r);
      else if (scales == Scales::kChunk) vnni::block_int4<R, M, true, Scales::kChunk>(p, o, r);
      else vnni::block_int4<R, M, true, Scales::kLane>(p, o, r);
    } else {
      if (scales == Scales::kRow) vnni::block_int4<R, M, false, Scales::kRow>(p, o, r);
      else if (scales == Scales::kChunk) vnni::block_int4<R, M, false, Scales::kChunk>(p, o, r);
      else vnni::block_int4<R, M, false, Scales::kLane>(p, o, r);
    }
  }
};

// Kernel rows o[0..R) against every row of x, Isa::kXRows at a time.
template <typename Isa, Bits B, int R>
void quantized_x_rows(const QuantizedProblem& p, const int64_t (&o)[R]) {
  int64_t r = 0;
  for (; r + Isa::kXRows <= p.rows; r += Isa::kXRows) Isa::template block<B, R, Isa::kXRows>(p, o, r);
  for (; r < p.rows; ++r) Isa::template block<B, R, 1>(p, o, r);
}

// Kernel rows [begin, end) against one x row, S rows at a time.
template <typename Isa, Bits B, int S>
int64_t one_x_row(const QuantizedProblem& p, int64_t begin, int64_t end) {
  return in_streams<S>(begin, end, [&](const int64_t (&o)[S]) { Isa::template block<B, S, 1>(p, o, 0); });
}

// Kernel rows [begin, end) in streams, as the bfloat16 kernel's `run_rows`.
template <typename Isa, Bits B>
void quantized_run_rows(const QuantizedProblem& p, int64_t begin, int64_t end) {
  if (p.rows > 1)
    begin = in_streams<Isa::kKernelRows>(begin, end, [&](const int64_t (&o)[Isa::kKernelRows]) {
      quantized_x_rows<Isa, B, Isa::kKernelRows>(p, o);
    });
  else if (const int streams = Isa::one_row_streams(p.n_in); streams == 8)
    begin = one_x_row<Isa, B, 8>(p, begin, end);
  else if (streams == 4)
    begin = one_x_row<Isa, B, 4>(p, begin, end);
  else
    begin = one_x_row<Isa, B, 2>(p, begin, end);
  for (int64_t o = begin; o < end; ++o) quantized_x_rows<Isa, B, 1>(p, {o});
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

bool cpu_has_gfni() { return __builtin_cpu_supports("gfni"); }

// Which loop a product takes: the CPU's best (VNNI where it has it, else
// AVX512, else AVX2), or one below it (for tests).
enum class Loop { kBest = 0, kAvx2 = 1, kAvx512 = 2, kVnniWithoutGfni = 3 };

// The int8 or int4 products of one x with one kernel or several (a layer's
// q, k and v; its gate and up), on the loop `loop` allows: one product over
// the kernels' rows one after another, cut into shares. One call for a
// layer's q, k and v and one for its gate and up: the 2B's 127 int4 products
// per decode step as 73 calls read 46.5-47.1 ms against 49.2-52.3 through
// torch's operator (each call's threads join late and end unevenly).
class QuantizedProduct : public SharedWork {
 public:
  // `problems` share bits, x, rows, n_in and group (each binding checks the group).
  QuantizedProduct(std::vector<QuantizedProblem> problems, int64_t threads, Loop loop = Loop::kBest)
      : problems_(std::move(problems)) {
    const QuantizedProblem& first = problems_[0];
    if (first.bits == Bits::kInt4) {  // sums in double, rounded once
      const int64_t groups = first.groups();
      x_sums_.resize(first.rows * groups);
      for (int64_t r = 0; r < first.rows; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          double sum = 0;
          for (int64_t k = g * first.group; k < (g + 1) * first.group; ++k) sum += first.x[r * first.n_in + k];
          x_sums_[r * groups + g] = float(sum);
        }
    }
    const bool avx512 = loop != Loop::kAvx2 && cpu_has_avx512();
    const bool int8 = first.bits == Bits::kInt8;
    run_rows_ = avx512 ? (int8 ? quantized_run_rows<Avx512, Bits::kInt8> : quantized_run_rows<Avx512, Bits::kInt4>)
                       : (int8 ? quantized_run_rows<Avx2, Bits::kInt8> : quantized_run_rows<Avx2, Bits::kInt4>);
    const bool vnni = (loop == Loop::kBest || loop == Loop::kVnniWithoutGfni) && cpu_has_avx512_vnni();
    if (vnni) {
      x_quantized_ = int8 ? vnni::quantize_x<Bits::kInt8>(first.x, first.rows, first.n_in, first.group)
                     : vnni::quantize_x<Bits::kInt4>(first.x, first.rows, first.n_in, first.group);
      run_rows_ = int8 ? quantized_run_rows<Avx512Vnni, Bits::kInt8> : quantized_run_rows<Avx512Vnni, Bits::kInt4>;
    }
    int64_t rows = 0, bytes = 0;
    for (QuantizedProblem& problem : problems_) {
      if (!int8) problem.x_sums = x_sums_.data();
      if (vnni) {
        problem.gfni = loop == Loop::kBest && cpu_has_gfni();
        problem.x_int8 = x_quantized_.values.data();
        problem.x_int16 = x_quantized_.wide_values.data();
        problem.x_scales = x_quantized_.scales.data();
        problem.lane_groups = x_quantized_.lane_groups.data();
      }
      first_rows_.push_back(rows);
      rows += problem.n_out;
      bytes += problem.n_out * problem.row_bytes();
    }
    split(rows, bytes, threads);
  }

 private:
  // Rows [begin, end) of the kernels one after another.
  void compute_rows(int64_t begin, int64_t end) const override {
    for (size_t i = 0; i < problems_.size(); ++i) {
      const int64_t first = first_rows_[i];
      const int64_t from = std::max(begin, first), to = std::min(end, first + problems_[i].n_out);
      if (from < to) run_rows_(problems_[i], from - first, to - first);
    }
  }
  std::vector<QuantizedProblem> problems_;
  std::vector<int64_t> first_rows_;  // each kernel's first row among all
  std::vector<float> x_sums_;
  vnni::QuantizedX x_quantized_;
  void (*run_rows_)(const QuantizedProblem&, int64_t, int64_t);
};

// Whether the arrays make a product: x [..., n_in], kernel [n_out, n_in]
// (int8) or [n_out, n_in / 2] (int4), scale (and int4's offset)
// [n_out, n_in / group] with group a multiple of 16 (int8) or 32 (int4).
bool quantized_shapes_fit(Bits bits, int64_t n_in, const std::vector<int64_t>& kernel,
                          const std::vector<int64_t>& scale, const std::vector<int64_t>* offset) {
  const int64_t multiple = bits == Bits::kInt8 ? 16 : 32;
  if (kernel.size() != 2 || scale.size() != 2 || n_in <= 0) return false;
  if (kernel[1] != (bits == Bits::kInt8 ? n_in : n_in / 2) || scale[0] != kernel[0]) return false;
  if (scale[1] <= 0 || n_in % scale[1] != 0 || (n_in / scale[1]) % multiple != 0) return false;
  return bits == Bits::kInt8 ? offset == nullptr : offset != nullptr && *offset == scale;
}

// The one-line error of arrays that do not fit, for every binding.
std::string quantized_shapes_error(Bits bits, const std::string& x, const std::string& kernel,
                                   const std::string& scale) {
  const std::string expected =
      bits == Bits::kInt8
          ? "gemma int8_linear takes float32 x [..., n_in] (torch, TensorFlow: or bfloat16), int8 "
            "kernels [n_out, n_in] and float32 scales [n_out, n_in / group], group a multiple of 16 "
            "and one for all kernels"
          : "gemma int4_linear takes float32 x [..., n_in] (torch, TensorFlow: or bfloat16), uint8 "
            "kernels [n_out, n_in / 2] and float32 scales and offsets [n_out, n_in / group], group "
            "a multiple of 32 and one for all kernels";
  return expected + "; not x " + x + ", kernel " + kernel + ", scale " + scale;
}

std::string shape_string(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

}  // namespace

extern "C" int gemma_bf16_linear_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Whether the CPU multiplies bfloat16 itself (AVX512-BF16): there the
// backends' own bfloat16 products are fast, and this kernel, widening and
// multiplying in float32 with AVX2, wins only on the fewest rows.
extern "C" int gemma_cpu_has_bfloat16_dot() {
  return __builtin_cpu_supports("avx512bf16");
}

// The instruction sets of the int8 and int4 products here.
extern "C" const char* gemma_quantized_linear_isa() {
  return cpu_has_avx512_vnni() ? "avx512-vnni" : cpu_has_avx512() ? "avx512" : "avx2";
}

// The int8 (bits 8) or int4 (bits 4) product for ctypes (tests, benchmarks),
// on the calling thread and `threads - 1` of the library's own; `loop` 0
// takes the CPU's best loop, 1 the AVX2 one, 2 AVX512's float one and 3
// VNNI's without GFNI (see `Loop`). `offset` is null for int8.
// Returns 0, or -1 where the shapes do not fit (see `quantized_shapes_fit`).
extern "C" int gemma_quantized_linear(int bits, const void* kernel, const float* scale,
                                      const float* offset, const float* x, float* out,
                                      int64_t rows, int64_t n_out, int64_t n_in, int64_t group,
                                      int64_t threads, int loop) {
  const Bits kind = bits == 8 ? Bits::kInt8 : Bits::kInt4;
  const std::vector<int64_t> kernel_dims = {n_out, kind == Bits::kInt8 ? n_in : n_in / 2};
  const std::vector<int64_t> scale_dims = {n_out, group > 0 ? n_in / group : 0};
  if ((bits != 8 && bits != 4) || rows < 1 || group <= 0 || n_in % group != 0 ||
      !quantized_shapes_fit(kind, n_in, kernel_dims, scale_dims, offset ? &scale_dims : nullptr))
    return -1;
  const QuantizedProblem problem{kind, static_cast<const uint8_t*>(kernel), scale, offset, x,
                                 nullptr, out, rows, n_out, n_in, group};
  if (loop < 0 || loop > 3) return -1;
  own_threads().run(QuantizedProduct({problem}, threads, static_cast<Loop>(loop)));
  return 0;
}

#ifdef GEMMA_KERAS_XLA_FFI
namespace ffi = xla::ffi;

// The XLA FFI handler, for a bfloat16 or float32 kernel: the shares run on
// XLA's own intra-op threads. Threads of its own beside them read less (a 2B
// decode step: 442 against 366 ms), as XLA's idle workers keep spinning on
// the cores for a while.
static ffi::Error Bf16Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer kernel,
                             ffi::ResultBuffer<ffi::F32> out) {
  const bool float32_kernel = kernel.element_type() == ffi::DataType::F32;
  if (!float32_kernel && kernel.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("gemma_bf16_linear takes a bfloat16 or float32 kernel");
  auto kernel_dims = kernel.dimensions();
  const Kind kind = float32_kernel ? Kind::kFloat32Rounded : Kind::kBfloat16;
  Bf16Product product(kernel.untyped_data(), kind, x.typed_data(), out->typed_data(),
                  x.dimensions()[0], kernel_dims[0], kernel_dims[1], pool.num_threads());
  run_on_pool(product, [&](auto task) { pool.Schedule(std::move(task)); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_bf16_linear_ffi, Bf16Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The XLA FFI handlers of the int8 and int4 products, on XLA's threads as
// the bfloat16 one: x float32 [..., n_in], then each kernel's integers and
// scale (int4: and offset) -> each kernel's out float32 [..., n_out].
template <typename Dimensions>
std::vector<int64_t> dims(Dimensions span) {
  return std::vector<int64_t>(span.begin(), span.end());
}

static ffi::Error QuantizedLinear(Bits bits, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  const size_t arrays = bits == Bits::kInt8 ? 2 : 3;  // per kernel
  const std::vector<int64_t> x_dims = dims(x.dimensions());
  const int64_t n_in = x_dims.empty() ? 0 : x_dims.back();
  if (outs.empty() || weights.size() != arrays * outs.size())
    return ffi::Error::InvalidArgument(
        std::string("gemma ") + (bits == Bits::kInt8 ? "int8_linear takes x, then a kernel and a scale"
                                                     : "int4_linear takes x, then a kernel, a scale and an offset") +
        " per output; not " + std::to_string(weights.size()) + " arrays for " + std::to_string(outs.size()) +
        " outputs");
  std::vector<QuantizedProblem> problems;
  for (size_t i = 0; i < outs.size(); ++i) {
    auto kernel = weights.get<ffi::AnyBuffer>(arrays * i);
    auto scale = weights.get<ffi::Buffer<ffi::F32>>(arrays * i + 1);
    auto offset = weights.get<ffi::Buffer<ffi::F32>>(arrays * i + arrays - 1);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(i);
    const auto integers = bits == Bits::kInt8 ? ffi::DataType::S8 : ffi::DataType::U8;
    const bool typed = kernel && scale && offset && out && kernel->element_type() == integers;
    const std::vector<int64_t> kernel_dims = kernel ? dims(kernel->dimensions()) : std::vector<int64_t>();
    const std::vector<int64_t> scale_dims = scale ? dims(scale->dimensions()) : std::vector<int64_t>();
    const std::vector<int64_t> offset_dims = offset ? dims(offset->dimensions()) : std::vector<int64_t>();
    if (!typed || !quantized_shapes_fit(bits, n_in, kernel_dims, scale_dims, bits == Bits::kInt4 ? &offset_dims : nullptr) ||
        (i > 0 && n_in / scale_dims[1] != problems[0].group))
      return ffi::Error::InvalidArgument(quantized_shapes_error(
          bits, shape_string(x_dims), shape_string(kernel_dims), shape_string(scale_dims)));
    problems.push_back({bits, static_cast<const uint8_t*>(kernel->untyped_data()), scale->typed_data(),
                        bits == Bits::kInt4 ? offset->typed_data() : nullptr, x.typed_data(), nullptr,
                        (*out)->typed_data(), int64_t(x.element_count()) / n_in, kernel_dims[0], n_in,
                        n_in / scale_dims[1]});
  }
  QuantizedProduct product(std::move(problems), pool.num_threads());
  run_on_pool(product, [&](auto task) { pool.Schedule(std::move(task)); });
  return ffi::Error::Success();
}

static ffi::Error Int8Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                             ffi::RemainingRets outs) {
  return QuantizedLinear(Bits::kInt8, pool, x, weights, outs);
}

static ffi::Error Int4Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                             ffi::RemainingRets outs) {
  return QuantizedLinear(Bits::kInt4, pool, x, weights, outs);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_int8_linear_ffi, Int8Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(gemma_int4_linear_ffi, Int4Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
#endif  // GEMMA_KERAS_XLA_FFI

#ifdef GEMMA_KERAS_TF_OP
// The TensorFlow operation GemmaBf16Linear(x: bfloat16 [..., n_in], kernel:
// bfloat16 or float32 [n_out, n_in]) -> bfloat16 [..., n_out], for decode
// steps that run without XLA (TensorFlow's XLA takes no custom calls). It
// widens x and rounds out itself, as TensorFlow's casts do (Eigen's bfloat16
// conversions), since each operation around it costs a decode step a
// dispatch per product (127 per 2B step). Its shares run on TensorFlow's
// intra-op threads, as the FFI handler's run on XLA's.
namespace tf = tensorflow;

REGISTER_OP("GemmaBf16Linear")
    .Input("x: bfloat16")
    .Input("kernel: T")
    .Output("out: bfloat16")
    .Attr("T: {bfloat16, float}")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      tf::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->ReplaceDim(c->input(0), -1, c->Dim(c->input(1), 0), &out));
      c->set_output(0, out);
      return tf::OkStatus();
    });

class GemmaBf16LinearOp : public tf::OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(tf::OpKernelContext* context) override {
    const tf::Tensor& x = context->input(0);
    const tf::Tensor& kernel = context->input(1);
    OP_REQUIRES(context, x.dims() >= 1 && kernel.dims() == 2 &&
                             x.dim_size(x.dims() - 1) == kernel.dim_size(1) &&
                             kernel.dim_size(1) % 16 == 0,
                tf::errors::InvalidArgument("GemmaBf16Linear takes x [..., n_in] and kernel [n_out, n_in] "
                                            "with n_in a multiple of 16, not ",
                                            x.shape().DebugString(), " and ", kernel.shape().DebugString()));
    const int64_t n_out = kernel.dim_size(0), n_in = kernel.dim_size(1);
    const int64_t rows = x.NumElements() / n_in;
    tf::TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, n_out);
    tf::Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, out_shape, &out));
    tf::Tensor wide_x, wide_out;
    OP_REQUIRES_OK(context, context->allocate_temp(tf::DT_FLOAT, tf::TensorShape({rows, n_in}), &wide_x));
    OP_REQUIRES_OK(context, context->allocate_temp(tf::DT_FLOAT, tf::TensorShape({rows, n_out}), &wide_out));
    const auto x_values = x.flat<Eigen::bfloat16>();
    auto wide_x_values = wide_x.flat<float>();
    for (int64_t i = 0; i < rows * n_in; ++i) wide_x_values(i) = static_cast<float>(x_values(i));
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    const Kind kind = kernel.dtype() == tf::DT_FLOAT ? Kind::kFloat32Rounded : Kind::kBfloat16;
    Bf16Product product(kernel.tensor_data().data(), kind, wide_x_values.data(),
                    wide_out.flat<float>().data(), rows, n_out, n_in, pool->NumThreads());
    run_on_pool(product, [&](auto task) { pool->Schedule(std::move(task)); });
    const auto wide_out_values = wide_out.flat<float>();
    auto out_values = out->flat<Eigen::bfloat16>();
    for (int64_t i = 0; i < rows * n_out; ++i) out_values(i) = Eigen::bfloat16(wide_out_values(i));
  }
};

REGISTER_KERNEL_BUILDER(Name("GemmaBf16Linear").Device(tf::DEVICE_CPU), GemmaBf16LinearOp);

// The TensorFlow operations GemmaInt8Linear(x: T [..., n_in], kernels: N
// int8 [n_out, n_in], scales: N float [n_out, groups]) and
// GemmaInt4Linear(x, kernels: N uint8 [n_out, n_in / 2], scales, offsets: N
// float [n_out, groups]) -> N T [..., n_out], one per kernel; T float32 or
// bfloat16, multiplied as float32 and rounded once, as torch's operators do.
tf::Status QuantizedLinearShapes(tf::shape_inference::InferenceContext* c) {
  int n;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  for (int i = 0; i < n; ++i) {
    tf::shape_inference::ShapeHandle out;
    TF_RETURN_IF_ERROR(c->ReplaceDim(c->input(0), -1, c->Dim(c->input(1 + i), 0), &out));
    c->set_output(i, out);
  }
  return tf::OkStatus();
}

REGISTER_OP("GemmaInt8Linear")
    .Attr("T: {float, bfloat16}")
    .Attr("N: int >= 1")
    .Input("x: T")
    .Input("kernels: N * int8")
    .Input("scales: N * float")
    .Output("outs: N * T")
    .SetShapeFn(QuantizedLinearShapes);

REGISTER_OP("GemmaInt4Linear")
    .Attr("T: {float, bfloat16}")
    .Attr("N: int >= 1")
    .Input("x: T")
    .Input("kernels: N * uint8")
    .Input("scales: N * float")
    .Input("offsets: N * float")
    .Output("outs: N * T")
    .SetShapeFn(QuantizedLinearShapes);

template <Bits B>
class GemmaQuantizedLinearOp : public tf::OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(tf::OpKernelContext* context) override {
    const tf::Tensor& x = context->input(0);
    tf::OpInputList kernels, scales, offsets;
    OP_REQUIRES_OK(context, context->input_list("kernels", &kernels));
    OP_REQUIRES_OK(context, context->input_list("scales", &scales));
    if (B == Bits::kInt4) OP_REQUIRES_OK(context, context->input_list("offsets", &offsets));
    const auto dims = [](const tf::Tensor& t) {
      std::vector<int64_t> sizes;
      for (int i = 0; i < t.dims(); ++i) sizes.push_back(t.dim_size(i));
      return sizes;
    };
    const int64_t n_in = x.dims() >= 1 ? x.dim_size(x.dims() - 1) : 0;
    const int64_t rows = n_in > 0 ? x.NumElements() / n_in : 0;
    // A bfloat16 x is multiplied as float32, into float32 outputs rounded once.
    const bool bfloat16 = x.dtype() == tf::DT_BFLOAT16;
    tf::Tensor wide_x = x;
    if (bfloat16) {
      OP_REQUIRES_OK(context, context->allocate_temp(tf::DT_FLOAT, tf::TensorShape({rows, n_in}), &wide_x));
      wide_x.flat<float>() = x.flat<Eigen::bfloat16>().cast<float>();
    }
    std::vector<tf::Tensor*> outs(kernels.size());
    std::vector<tf::Tensor> wide_outs(kernels.size());
    std::vector<QuantizedProblem> problems;
    for (int i = 0; i < kernels.size(); ++i) {
      const std::vector<int64_t> kernel_dims = dims(kernels[i]), scale_dims = dims(scales[i]);
      const std::vector<int64_t> offset_dims = B == Bits::kInt4 ? dims(offsets[i]) : std::vector<int64_t>();
      OP_REQUIRES(context,
                  quantized_shapes_fit(B, n_in, kernel_dims, scale_dims, B == Bits::kInt4 ? &offset_dims : nullptr) &&
                      (i == 0 || n_in / scale_dims[1] == problems[0].group),
                  tf::errors::InvalidArgument(quantized_shapes_error(B, x.shape().DebugString(),
                                                                     kernels[i].shape().DebugString(),
                                                                     scales[i].shape().DebugString())));
      tf::TensorShape out_shape = x.shape();
      out_shape.set_dim(x.dims() - 1, kernel_dims[0]);
      OP_REQUIRES_OK(context, context->allocate_output(i, out_shape, &outs[i]));
      wide_outs[i] = *outs[i];
      if (bfloat16)
        OP_REQUIRES_OK(context,
                       context->allocate_temp(tf::DT_FLOAT, tf::TensorShape({rows, kernel_dims[0]}), &wide_outs[i]));
      problems.push_back({B, reinterpret_cast<const uint8_t*>(kernels[i].tensor_data().data()),
                          scales[i].flat<float>().data(), B == Bits::kInt4 ? offsets[i].flat<float>().data() : nullptr,
                          wide_x.flat<float>().data(), nullptr, wide_outs[i].flat<float>().data(), rows,
                          kernel_dims[0], n_in, n_in / scale_dims[1]});
    }
    // On the library's own threads, which spin between products: TensorFlow's
    // intra-op threads sleep between operations and, woken for each product,
    // joined it 50-200 us late (the 2B's int4 decode step 66 against 68 ms).
    const int64_t threads = context->device()->tensorflow_cpu_worker_threads()->workers->NumThreads();
    own_threads().run(QuantizedProduct(std::move(problems), threads));
    if (!bfloat16) return;
    for (size_t i = 0; i < outs.size(); ++i) outs[i]->flat<Eigen::bfloat16>() = wide_outs[i].flat<float>().cast<Eigen::bfloat16>();
  }
};

REGISTER_KERNEL_BUILDER(Name("GemmaInt8Linear").Device(tf::DEVICE_CPU), GemmaQuantizedLinearOp<Bits::kInt8>);
REGISTER_KERNEL_BUILDER(Name("GemmaInt4Linear").Device(tf::DEVICE_CPU), GemmaQuantizedLinearOp<Bits::kInt4>);
#endif  // GEMMA_KERAS_TF_OP

#ifdef GEMMA_KERAS_TORCH_OP
// Runs `product` on torch's intra-op (OpenMP) threads, the calling thread
// among them, up to `torch.get_num_threads()`. Threads of the library's own
// beside them ran slower: torch's idle OpenMP workers keep spinning on the
// cores for milliseconds after each parallel region of torch's.
void run_on_torch_threads(const SharedWork& product) {
  Shares shares(product.parts());
  at::parallel_for(0, product.threads(), 1, [&](int64_t, int64_t) { shares.work(product); });
}

// x [..., n_in] (float32 or bfloat16) as float32 rows: a contiguous float32
// x as it is, else widened here. The casts and reshapes around a product are
// done in C++, where in a traced step each would be a node (2-3 dispatches
// of a few microseconds each).
struct TorchRows {
  explicit TorchRows(const at::Tensor& x) : dense(x.contiguous()) {
    const int64_t n_in = x.dim() >= 1 ? x.size(-1) : 0;
    count = n_in > 0 ? x.numel() / n_in : 0;
    if (dense.scalar_type() == at::kFloat) {
      data = dense.data_ptr<float>();
    } else {
      const c10::BFloat16* values = dense.data_ptr<c10::BFloat16>();
      wide.assign(values, values + dense.numel());
      data = wide.data();
    }
  }
  at::Tensor dense;
  std::vector<float> wide;
  const float* data = nullptr;
  int64_t count = 0;
};

// An output of `sizes` in x's dtype: `data` takes float32 sums, which
// `finish()` rounds to bfloat16 where x is bfloat16 (to nearest even, as
// torch's cast rounds).
struct TorchOut {
  TorchOut(const std::vector<int64_t>& sizes, const at::Tensor& x) : tensor(at::empty(sizes, x.options())) {
    if (tensor.scalar_type() == at::kFloat) {
      data = tensor.data_ptr<float>();
    } else {
      wide.resize(tensor.numel());
      data = wide.data();
    }
  }
  at::Tensor finish() {
    if (!wide.empty()) std::copy(wide.begin(), wide.end(), tensor.data_ptr<c10::BFloat16>());
    return tensor;
  }
  at::Tensor tensor;
  std::vector<float> wide;
  float* data = nullptr;
};

// The torch operator gemma_keras::bf16_linear(x [..., n_in], kernel [n_out,
// n_in], threads) -> [..., n_out] in x's dtype, on up to `threads` of
// torch's intra-op threads. Bfloat16 x
// takes a bfloat16 kernel or a float32 one (multiplied as its bfloat16
// cast); float32 x takes a float32 kernel, multiplied as it is (torch's own
// float32 product reads one row at 72-77% of XLA's rate here, and 2 to 8
// rows slower than this kernel reads 8). Registered from C++ so that a
// traced step calls it without Python: a Python-implemented operator cost
// about 50 us a call against 8 (127 calls per 2B decode step).
at::Tensor TorchBf16Linear(const at::Tensor& x, const at::Tensor& kernel, int64_t threads) {
  const bool float32_x = x.scalar_type() == at::kFloat;
  const bool float32_kernel = kernel.scalar_type() == at::kFloat;
  TORCH_CHECK((float32_x ? float32_kernel
                         : x.scalar_type() == at::kBFloat16 &&
                               (float32_kernel || kernel.scalar_type() == at::kBFloat16)) &&
                  kernel.dim() == 2 && x.dim() >= 1 && x.size(-1) == kernel.size(1) &&
                  kernel.size(1) % 16 == 0,
              "gemma_keras::bf16_linear takes bfloat16 x [..., n_in] with a bfloat16 or float32 "
              "kernel [n_out, n_in], or float32 x with a float32 kernel, n_in a multiple of 16; "
              "not ", x.scalar_type(), " ", x.sizes(), " and ", kernel.scalar_type(), " ",
              kernel.sizes());
  const Kind kind = float32_x        ? Kind::kFloat32
                    : float32_kernel ? Kind::kFloat32Rounded
                                     : Kind::kBfloat16;
  const TorchRows rows(x);
  const at::Tensor rows_major = kernel.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = kernel.size(0);
  TorchOut out(sizes, x);
  run_on_torch_threads(Bf16Product(rows_major.data_ptr(), kind, rows.data, out.data, rows.count,
                                   kernel.size(0), kernel.size(1), threads));
  return out.finish();
}

// The torch operators gemma_keras::int8_linear(x, weights, threads) and
// gemma_keras::int4_linear(x, weights, threads): float32 or bfloat16 x
// [..., n_in] -> one [..., n_out] in x's dtype per kernel, `weights` holding
// each kernel's integers (int8 [n_out, n_in], or uint8 packed int4 [n_out,
// n_in / 2]) then its float32 scale (int4: and offset) [n_out, groups]; on up
// to `threads` of torch's intra-op threads. One list, as XLA's handlers take
// them: each list is a node that a traced step replays. The casts and reshapes
// are here, in C++, where in a traced step each would be a node too.
std::vector<at::Tensor> TorchQuantizedLinear(Bits bits, const at::Tensor& x, at::TensorList weights,
                                             int64_t threads) {
  const size_t arrays = bits == Bits::kInt8 ? 2 : 3;  // per kernel
  const char* name = bits == Bits::kInt8 ? "int8" : "int4";
  TORCH_CHECK(!weights.empty() && weights.size() % arrays == 0, "gemma_keras::", name, "_linear takes ",
              bits == Bits::kInt8 ? "a kernel and a scale" : "a kernel, a scale and an offset",
              " per output; not ", weights.size(), " tensors");
  const int64_t n_in = x.dim() >= 1 ? x.size(-1) : 0;
  // (x of no width fails the first kernel's check below)
  const bool x_fits = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  const TorchRows rows(x_fits ? x : x.to(at::kFloat));
  // The weights made contiguous, alive while the product reads them, and the outputs.
  std::vector<at::Tensor> contiguous;
  std::vector<TorchOut> outs;
  outs.reserve(weights.size() / arrays);
  std::vector<QuantizedProblem> problems;
  std::vector<int64_t> sizes = x.sizes().vec();
  for (size_t i = 0; i < weights.size(); i += arrays) {
    const at::Tensor &kernel = weights[i], &scale = weights[i + 1], &offset = weights[i + arrays - 1];
    const std::vector<int64_t> kernel_dims = kernel.sizes().vec(), scale_dims = scale.sizes().vec();
    const std::vector<int64_t> offset_dims = offset.sizes().vec();
    const bool dtypes_fit = x_fits && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                            kernel.scalar_type() == (bits == Bits::kInt8 ? at::kChar : at::kByte);
    TORCH_CHECK(dtypes_fit &&
                    quantized_shapes_fit(bits, n_in, kernel_dims, scale_dims,
                                         bits == Bits::kInt4 ? &offset_dims : nullptr) &&
                    (problems.empty() || n_in / scale_dims[1] == problems[0].group),
                quantized_shapes_error(bits, shape_string(x.sizes().vec()), shape_string(kernel_dims),
                                       shape_string(scale_dims)),
                " (dtypes ", x.scalar_type(), ", ", kernel.scalar_type(), ", ", scale.scalar_type(), ")");
    for (size_t k = i; k < i + arrays; ++k) contiguous.push_back(weights[k].contiguous());
    const at::Tensor* own = &contiguous[contiguous.size() - arrays];
    sizes.back() = kernel_dims[0];
    outs.emplace_back(sizes, x);
    problems.push_back({bits, static_cast<const uint8_t*>(own[0].data_ptr()), own[1].data_ptr<float>(),
                        bits == Bits::kInt4 ? own[2].data_ptr<float>() : nullptr, rows.data, nullptr,
                        outs.back().data, rows.count, kernel_dims[0], n_in, n_in / scale_dims[1]});
  }
  run_on_torch_threads(QuantizedProduct(std::move(problems), threads));
  std::vector<at::Tensor> results;
  for (TorchOut& out : outs) results.push_back(out.finish());
  return results;
}

std::vector<at::Tensor> TorchInt8Linear(const at::Tensor& x, at::TensorList weights, int64_t threads) {
  return TorchQuantizedLinear(Bits::kInt8, x, weights, threads);
}

std::vector<at::Tensor> TorchInt4Linear(const at::Tensor& x, at::TensorList weights, int64_t threads) {
  return TorchQuantizedLinear(Bits::kInt4, x, weights, threads);
}

TORCH_LIBRARY(gemma_keras, library) {
  library.def("bf16_linear(Tensor x, Tensor kernel, int threads) -> Tensor");
  library.def("int8_linear(Tensor x, Tensor[] weights, int threads) -> Tensor[]");
  library.def("int4_linear(Tensor x, Tensor[] weights, int threads) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(gemma_keras, CPU, library) {
  library.impl("bf16_linear", &TorchBf16Linear);
  library.impl("int8_linear", &TorchInt8Linear);
  library.impl("int4_linear", &TorchInt4Linear);
}
#endif  // GEMMA_KERAS_TORCH_OP
