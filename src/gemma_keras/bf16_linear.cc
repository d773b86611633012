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
// (GEMMA_KERAS_TORCH_OP, against torch's), on threads of the library's own.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
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
#include <torch/library.h>
#endif

namespace {

// How far ahead of its reads each kernel row stream asks for memory, in
// bytes (8 cache lines). The hardware prefetchers stop at each 4 KB page;
// asking ahead carries a stream across pages (1 GB bfloat16 kernel, 2
// threads, medians of 12 alternating rounds: 13.2 and 14.9 GB/s against 10.6
// and 12.9 without; 256 to 768 bytes ahead read alike).
constexpr int64_t kPrefetchBytes = 512;

// Shares of kernel rows per thread, claimed by whichever thread is free: a
// thread that starts late (woken from sleep) or runs slow leaves its shares
// to the others, where with one share per thread the others wait for it.
// kSpin: how long a thread with nothing to do keeps checking for work before
// it sleeps, since waking a sleeping thread is slow on a VM and a decode step
// starts its next product well within 2 ms. The 2B's 127 products of one
// decode step on 2 threads, alternating in one process, medians of 8: 311 ms
// with one share per thread and no spinning, 259 with 8 shares, 233 with 8
// shares and 2 ms of spinning.
constexpr int64_t kSharesPerThread = 8;
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

// The product with x reordered for `block`, cut into `parts` shares of
// kernel rows (multiples of 8) for `threads` threads.
class Product {
 public:
  Product(const void* kernel, Kind kind, const float* x, float* out, int64_t rows, int64_t n_out,
          int64_t n_in, int64_t threads)
      : x_blocked_(rows * n_in),
        problem_{kernel, x_blocked_.data(), out, rows, n_out, n_in},
        run_rows_(kind == Kind::kBfloat16         ? run_rows<Kind::kBfloat16>
                  : kind == Kind::kFloat32Rounded ? run_rows<Kind::kFloat32Rounded>
                                                  : run_rows<Kind::kFloat32>) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < n_in; k += 16)
        for (int64_t slot = 0; slot < 16; ++slot)
          x_blocked_[r * n_in + k + slot] = x[r * n_in + k + slot_column(kind, slot)];
    // Small kernels (under 2 MB) are not worth a second thread.
    const int64_t bytes = n_out * n_in * (kind == Kind::kBfloat16 ? sizeof(uint16_t) : sizeof(float));
    threads_ = bytes < (int64_t(2) << 20) || threads < 1 ? 1 : threads;
    const int64_t wanted = threads_ == 1 ? 1 : threads_ * kSharesPerThread;
    share_ = std::max<int64_t>(8, ((n_out + wanted - 1) / wanted + 7) / 8 * 8);
    parts_ = std::max<int64_t>(1, (n_out + share_ - 1) / share_);
    threads_ = std::min(threads_, parts_);
  }
  int64_t parts() const { return parts_; }
  int64_t threads() const { return threads_; }
  void run(int64_t part) const {
    int64_t begin = part * share_;
    run_rows_(problem_, begin, std::min(problem_.n_out, begin + share_));
  }

 private:
  std::vector<float> x_blocked_;
  Problem problem_;
  void (*run_rows_)(const Problem&, int64_t, int64_t);
  int64_t threads_, share_, parts_;
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
  void work(const Product& product) {
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
void run_on_pool(const Product& product, Schedule schedule) {
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
// (torch): started on first use, asleep between products after kSpin. One
// product runs at a time; a helper that wakes after its product is done
// finds no share.
class OwnThreads {
 public:
  void run(const Product& product) {
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
      const Product* product;
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
  const Product* product_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  int64_t helpers_ = 0;
};

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
  Product product(kernel.untyped_data(), kind, x.typed_data(), out->typed_data(),
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
    Product product(kernel.tensor_data().data(), kind, wide_x_values.data(),
                    wide_out.flat<float>().data(), rows, n_out, n_in, pool->NumThreads());
    run_on_pool(product, [&](auto task) { pool->Schedule(std::move(task)); });
    const auto wide_out_values = wide_out.flat<float>();
    auto out_values = out->flat<Eigen::bfloat16>();
    for (int64_t i = 0; i < rows * n_out; ++i) out_values(i) = Eigen::bfloat16(wide_out_values(i));
  }
};

REGISTER_KERNEL_BUILDER(Name("GemmaBf16Linear").Device(tf::DEVICE_CPU), GemmaBf16LinearOp);
#endif  // GEMMA_KERAS_TF_OP

#ifdef GEMMA_KERAS_TORCH_OP
// The torch operator gemma_keras::bf16_linear(x [..., n_in], kernel [n_out,
// n_in], threads) -> [..., n_out] in x's dtype, on the calling thread and
// `threads - 1` of the library's own (torch has no pool to lend). Bfloat16 x
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
  const at::Tensor flat = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
  const at::Tensor rows_major = kernel.contiguous();
  at::Tensor out = at::empty({flat.size(0), kernel.size(0)}, flat.options());
  // Never freed: detached helpers wait on it until the process exits.
  static OwnThreads* own_threads = new OwnThreads;
  own_threads->run(Product(rows_major.data_ptr(), kind, flat.data_ptr<float>(),
                           out.data_ptr<float>(), flat.size(0), kernel.size(0), kernel.size(1),
                           threads));
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = kernel.size(0);
  return out.to(x.scalar_type()).reshape(sizes);
}

TORCH_LIBRARY(gemma_keras, library) {
  library.def("bf16_linear(Tensor x, Tensor kernel, int threads) -> Tensor");
}
TORCH_LIBRARY_IMPL(gemma_keras, CPU, library) { library.impl("bf16_linear", &TorchBf16Linear); }
#endif  // GEMMA_KERAS_TORCH_OP
