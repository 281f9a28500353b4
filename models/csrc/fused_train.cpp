// Fused training kernels of the BNext processor (CPU, float32, contiguous NCHW).
//
// In a binary network the convolutions are the real work; around each one the
// processor runs a chain of per-element operations (bias + sign, batch norm, PReLU,
// the spatial mean for the recoupling gate, gate * b [* residual], a second batch
// norm, + residual). Run one PyTorch kernel at a time, each of them reads and writes
// the whole activation, forward and backward. These kernels run each chain in two
// or three passes over the data, and recompute the values that the backward needs
// from the saved inputs instead of storing them; a recoupled processor's tail does not
// even store its first batch norm's output b: bn_prelu_statistics keeps only what the
// gate needs, and the gated kernels recompute b from the convolution's output (b_affine).
//
// The kernels split their work between threads (at::parallel_for) by samples, as the
// convolutions before and after them split their batch, so that a thread mostly reads
// what it wrote itself: the sign kernels walk their range of samples in memory order
// (for_each_sample_run, sum_over_samples), long runs that the hardware prefetchers keep
// up with. The batch-norm kernels do so for activations that fit a last-level cache; on
// larger ones a thread takes a chunk of its range of channels at a time, walks it sample
// by sample (in each sample the chunk's planes are one contiguous run of values) and
// makes the second pass while the chunk is still in its L2 cache (two_passes).
// Per-channel sums (batch-norm statistics, parameter gradients) are not reduced plane
// by plane: each value position of a plane has its own accumulator (planes of more than
// kLanes values share kLanes), added to in float over blocks of samples and then in
// double, and a channel's accumulators are added up once, at the end, in order. So the
// loops are plain vectorized element-wise loops over a plane (or, for planes of one value, over the
// run) whatever the plane size: the late stages' planes of 4 or 16 values no longer pay
// a horizontal reduction and a double conversion per plane, which made those layers
// several times slower per value than large ones. The results do not depend on the
// thread count or on the split, and the sums are about as accurate as PyTorch's
// double-accumulating batch-norm statistics.
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), name, " must be a contiguous N x C x H x W tensor");
}

// A gradient of the shape of `like` whose samples are each one contiguous C x H x W block,
// at any distance apart (a channel slice of a concatenation's gradient is one): the
// distance in values. The kernels read such a gradient as it is instead of a copy.
int64_t sample_stride(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape ", like.sizes());
  TORCH_CHECK(t.size(0) > 0 && t.select(0, 0).is_contiguous(), name,
              " must hold each sample as one contiguous C x H x W block");
  return t.stride(0);
}

void check_vector(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == C, name,
              " must be a contiguous float32 CPU tensor of ", C, " values");
}

// Plane sums (the spatial means, the gate's gradient) add float sums of kBlock
// consecutive values in double.
constexpr int64_t kBlock = 128;
// Accumulators per chunk (per quantity summed): a chunk holds this many values of one
// sample (at least one plane) up to planes of kLanes values, so that its accumulators
// stay in the core's L1 cache (a few kB each). In a standalone test of
// bn_prelu_backward's first pass, 1024 beat 512 and 4096 on most plane sizes.
constexpr int64_t kRunValues = 1024;
// Values per input that a chunk of a two-pass kernel holds over all samples at most (a
// chunk of kRunValues accumulators holds more on planes of more than kLanes values, 4 MiB
// per input at 32x32 and batch 64): 256 KiB per tensor, so that the second pass over a
// chunk reads its inputs (up to three) and writes its outputs in a 2 MiB L2 cache instead
// of the L3. In an interleaved comparison with the uncapped chunks, 64k gained more than
// 32k and 128k (benchmarks/fused_kernels_ab.py measures such changes).
constexpr int64_t kCacheValues = 1 << 16;
// Per-position sums run in float over about this many values, then are added in double.
constexpr int64_t kSampleBlock = 16;
// Planes of more than kLanes values share kLanes accumulators per channel (value i adds
// to lane i % kLanes), so that a chunk can hold many channels of a large plane: a
// thread then reads long contiguous runs, as memory prefetching wants (with one channel
// per chunk, the 32x32 planes' kernels were up to 40 % slower than plane by plane).
constexpr int64_t kLanes = 64;

// Accumulators per channel for planes of HW values.
inline int64_t lanes(int64_t HW) { return std::min(HW, kLanes); }

// Per-channel sums. Each channel belongs to one thread, which adds the channel's sums
// once: the results do not depend on the number of threads.
struct ChannelSums {
  ChannelSums(int64_t channels, int64_t count) : count(count), values(channels * count, 0.0) {}
  void add(int64_t c, int64_t which, double value) { values[c * count + which] += value; }
  double get(int64_t c, int64_t which) const { return values[c * count + which]; }
  int64_t count;
  std::vector<double> values;
};

// The channels [c0, c1) of one chunk; a run is their planes in one sample, length values.
struct Chunk {
  int64_t c0, c1, length;
  int64_t planes() const { return c1 - c0; }
  int64_t offset(int64_t n, int64_t C, int64_t HW) const { return (n * C + c0) * HW; }
};

// Calls fn(HW) with HW a compile-time constant for the late stages' planes (1, 4 and 16
// values), so that the per-plane loops unroll.
template <typename Fn>
void with_plane_size(int64_t HW, const Fn& fn) {
  switch (HW) {
    case 1: fn(std::integral_constant<int64_t, 1>{}); break;
    case 4: fn(std::integral_constant<int64_t, 4>{}); break;
    case 16: fn(std::integral_constant<int64_t, 16>{}); break;
    default: fn(HW);
  }
}

// Runs fn(chunk, hw) for chunks of channels (the two-pass kernels). Threads take
// contiguous ranges of channels, about 64k values each at least (small layers stay on
// the calling thread), and cut them into chunks of about kRunValues accumulators
// (kRunValues values per sample up to planes of kLanes values, more beyond) that hold at
// most kCacheValues values over all samples, so that a second pass over a chunk finds its
// inputs in the core's L2 cache (two_passes). For the late stages' planes (1, 4 and 16
// values) hw is a compile-time constant, so the per-plane loops unroll.
template <typename Fn>
void for_each_chunk(int64_t N, int64_t C, int64_t HW, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, N * HW));
  const int64_t fit = kCacheValues / std::max<int64_t>(1, N * HW);
  const int64_t channels_per_chunk =
      std::max<int64_t>(1, std::min(kRunValues / std::max<int64_t>(1, lanes(HW)), fit));
  const auto run = [&](auto hw) {
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c0 = begin; c0 < end; c0 += channels_per_chunk) {
        const int64_t c1 = std::min(end, c0 + channels_per_chunk);
        fn(Chunk{c0, c1, (c1 - c0) * HW}, hw);
      }
    });
  };
  with_plane_size(HW, run);
}

// Runs fn(p) for every (sample, channel) plane p of HW values, in parallel: for kernels
// without sums (the pooling), where the order does not matter.
template <typename Fn>
void for_each_plane(int64_t planes, int64_t HW, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, HW));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p);
  });
}

// Calls body(j, q, slot) for every value j = q * HW + i of a run of `planes` planes, plane
// q, whose per-channel sums go to accumulator `slot` (j up to kLanes values per plane, else
// q * kLanes + i % kLanes). The body reads per-channel and per-plane scalars at q,
// per-value arrays at j. Planes of 4 values and more: vectorized loops over each plane,
// with its scalars broadcast; planes of one value: one vectorized loop over the run,
// where the scalars are arrays.
// Bodies capture by value ([=]), so their pointers and flags are locals that no store
// can alias, and read every input before any select: a load under a condition keeps
// GCC from vectorizing the loop at all (it was ten times slower that way).
template <typename HWt, typename Body>
inline void for_each_value(int64_t planes, HWt HW, const Body& body) {
  if constexpr (std::is_same_v<HWt, std::integral_constant<int64_t, 1>>) {
#pragma omp simd
    for (int64_t q = 0; q < planes; ++q) body(q, q, q);
  } else {
    if (HW <= kLanes) {
      for (int64_t q = 0; q < planes; ++q) {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) body(q * HW + i, q, q * HW + i);
      }
      return;
    }
    for (int64_t q = 0; q < planes; ++q) {
      for (int64_t i0 = 0; i0 < HW; i0 += kLanes) {
        const int64_t count = std::min<int64_t>(kLanes, HW - i0);
#pragma omp simd
        for (int64_t l = 0; l < count; ++l) body(q * HW + i0 + l, q, q * kLanes + l);
      }
    }
  }
}

// out[p] = (sum of plane p's HW values) / divisor, for `planes` consecutive planes.
template <typename HWt>
void plane_sums(const float* values, int64_t planes, HWt HW, double divisor, float* out) {
  if constexpr (!std::is_same_v<HWt, int64_t>) {
    // Planes of 1, 4 or 16 values: a float sum in order (it unrolls) and a float
    // division, exact for these divisors. Converting and dividing in double cost about
    // four times as much per plane, as much as the kernel's own pass on such planes.
    const float d = static_cast<float>(divisor);
    for (int64_t p = 0; p < planes; ++p) {
      float sum = 0.0f;
      for (int64_t i = 0; i < HW; ++i) sum += values[p * HW + i];
      out[p] = sum / d;
    }
    return;
  }
  for (int64_t p = 0; p < planes; ++p) {
    const float* v = values + p * HW;
    double sum = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float block = 0.0f;
#pragma omp simd reduction(+ : block)
      for (int64_t i = i0; i < i1; ++i) block += v[i];
      sum += block;
    }
    out[p] = static_cast<float>(sum / divisor);
  }
}

// How many samples' values a per-position float sum takes before it is added in double:
// about kSampleBlock values per accumulator.
inline int64_t samples_per_flush(int64_t HW) {
  return std::max<int64_t>(1, kSampleBlock / ((HW + kLanes - 1) / kLanes));
}

// Per-channel sums, `count` quantities, kept per accumulator (see for_each_value): a
// run's loop adds to partial(k)[slot]; end_sample() moves the float partial sums into
// double once they hold samples_per_flush(HW) samples' values; add_to() adds each
// channel's accumulators, in order, to `sums`.
class PositionSums {
 public:
  PositionSums(int64_t count, int64_t length, int64_t HW)
      : count_(count),
        length_(length),
        samples_per_flush_(samples_per_flush(HW)),
        partial_(count * length, 0.0f),
        total_(count * length, 0.0) {}
  float* partial(int64_t which) { return partial_.data() + which * length_; }
  void end_sample() {
    if (++samples_ == samples_per_flush_) flush();
  }
  void add_to(ChannelSums& sums, const Chunk& chunk, int64_t per_channel) {
    flush();
    for (int64_t c = chunk.c0; c < chunk.c1; ++c) {
      for (int64_t k = 0; k < count_; ++k) {
        const double* t = total_.data() + k * length_ + (c - chunk.c0) * per_channel;
        double sum = 0.0;
        for (int64_t i = 0; i < per_channel; ++i) sum += t[i];
        sums.add(c, k, sum);
      }
    }
  }

 private:
  void flush() {
    float* p = partial_.data();
    double* t = total_.data();
#pragma omp simd
    for (int64_t j = 0; j < count_ * length_; ++j) {
      t[j] += p[j];
      p[j] = 0.0f;
    }
    samples_ = 0;
  }
  int64_t count_, length_, samples_per_flush_, samples_ = 0;
  std::vector<float> partial_;
  std::vector<double> total_;
};

// Runs fn(n, chunk, hw) over all N x C planes in memory order, in parallel: each thread
// takes a contiguous range of planes (about 64k values at least), cut where a sample
// ends. For single-pass kernels without per-channel sums: a thread reads one long run
// instead of a chunk of channels sample after sample (runs of 4 kB on small planes, on
// which the loads waited for memory: such kernels reached half the bandwidth of an
// element-wise PyTorch operator on 8x8 planes, a fifth on 2x2 ones).
template <typename Fn>
void for_each_sample_run(int64_t N, int64_t C, int64_t HW, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, HW));
  with_plane_size(HW, [&](auto hw) {
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end;) {
        const int64_t n = p / C, c0 = p % C, c1 = std::min(C, c0 + (end - p));
        fn(n, Chunk{c0, c1, (c1 - c0) * HW}, hw);
        p += c1 - c0;
      }
    });
  });
}

// The float partial sums of one group of samples, `count` quantities of `slots`
// accumulators each, seen from channel c0 on: partial(k)[slot] as in PositionSums.
struct GroupSums {
  float* base;
  int64_t slots, first;
  float* partial(int64_t k) const { return base + k * slots + first; }
};

// Per-channel sums of sums.count quantities over all samples (a single pass over the
// data). The samples form groups of samples_per_flush(HW), each with its own float
// accumulators; the groups' accumulators are then added in double, group after group,
// and each channel's accumulators in order. These are the additions of PositionSums, in
// its order: the same bits as the channel-chunked first pass of two_passes, for any
// thread count and any split of the work. The work items are (group of samples, range of
// channels), in that order, so that each thread takes a range of samples, as
// for_each_sample_run does and as the convolutions around the kernels split their
// batch: a thread then mostly reads what it wrote itself. (Split by channels instead,
// half of every input had been written by the other thread; where the two vCPUs of the
// development machine sat on different core complexes, a BNext-T step's sign backward
// took twice as long that way.) The channel ranges split a group between threads only
// where there are fewer groups than threads.
template <typename Sum>
void sum_over_samples(int64_t N, int64_t C, int64_t HW, ChannelSums& sums, const Sum& sum) {
  with_plane_size(HW, [&](auto hw) {
    const int64_t per_channel = lanes(hw), slots = C * per_channel, count = sums.count;
    const int64_t group = samples_per_flush(hw), groups = (N + group - 1) / group;
    const int64_t parts = std::min<int64_t>(C, std::max<int64_t>(1, at::get_num_threads()));
    // Work items (group of samples, channel range), group-major, so that a thread's
    // contiguous share of them is a range of samples (about 64k values at least).
    const int64_t item_values = std::max<int64_t>(1, group * (C / parts) * HW);
    // Each item zeroes its own accumulators: no single-threaded zeroing of them all first.
    const std::unique_ptr<float[]> partials(new float[groups * count * slots]);
    at::parallel_for(0, parts * groups, std::max<int64_t>(1, (1 << 16) / item_values), [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t g = item / parts, part = item % parts;
        const int64_t c0 = part * C / parts, c1 = (part + 1) * C / parts;
        const GroupSums acc{partials.get() + g * count * slots, slots, c0 * per_channel};
        for (int64_t k = 0; k < count; ++k) std::fill(acc.partial(k), acc.partial(k) + (c1 - c0) * per_channel, 0.0f);
        for (int64_t n = g * group; n < std::min(N, (g + 1) * group); ++n) {
          sum(Chunk{c0, c1, (c1 - c0) * HW}, n, hw, acc);
        }
      }
    });
    // The groups' sums in double, group after group (vectorized over the accumulators),
    // then each channel's accumulators in order.
    const int64_t grain = std::max<int64_t>(1, kRunValues / per_channel);
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      const int64_t first = c0 * per_channel, length = (c1 - c0) * per_channel;
      std::vector<double> totals(length);
      for (int64_t k = 0; k < count; ++k) {
        double* t = totals.data();
        std::fill(t, t + length, 0.0);
        for (int64_t g = 0; g < groups; ++g) {
          const float* p = partials.get() + (g * count + k) * slots + first;
#pragma omp simd
          for (int64_t j = 0; j < length; ++j) t[j] += p[j];
        }
        for (int64_t c = c0; c < c1; ++c) {
          double channel = 0.0;
          for (int64_t i = 0; i < per_channel; ++i) channel += t[(c - c0) * per_channel + i];
          sums.add(c, k, channel);
        }
      }
    });
  });
}

// Activations of at most this many values (32 MiB of float32) run the two-pass kernels
// split by samples, larger ones by channel chunks (two_passes). Measured on the AMD EPYC
// development machine (L3 32 MiB per core complex, L2 1 MiB per core), kernel by kernel
// at batch 64: split by samples, the gated batch norm and the backward kernels were 10
// to 20 % faster on activations of up to 6.4M values (28x28 planes and smaller) with the
// two vCPUs on one core complex and 15 to 35 % faster with them on two; at 25.7M values
// (112x112 planes) they were 10 to 25 % slower, their second pass reading from memory
// what the channel chunks find in the L2 cache. Variable only so that tests and
// benchmarks can force either split (set_sample_split_values): the bits are the same.
int64_t g_sample_split_values = int64_t{1} << 23;

// The two passes of a batch-norm kernel: sum(chunk, n, hw, acc) adds each value of sample
// n's planes of the chunk's channels to acc.partial(k)[slot] (per-position sums);
// finish(chunk) turns the chunk's per-channel sums into its per-channel coefficients;
// apply(n, chunk, hw) makes the second pass over sample n's planes of the chunk. Two
// ways to split the work, the same bits (each channel's sums keep their order):
// - activations of up to g_sample_split_values values: by samples. sum_over_samples
//   makes the first pass, each thread over its range of samples; then finish over all
//   channels; then the second pass in memory order (for_each_sample_run), each thread
//   again over about the samples it summed, which its cache still holds. Every thread
//   reads the samples that the convolution before the kernel wrote on it (the
//   convolutions split their batch) and writes those that the next one will read there.
// - larger ones: chunk by chunk of channels (for_each_chunk). For each chunk, the first
//   pass over all samples, finish, the second pass: a chunk holds at most kCacheValues
//   values per input over all samples, which the second pass finds in a core's L2 cache
//   instead of reading them from memory a second time.
template <typename Sum, typename Finish, typename Apply>
void two_passes(int64_t N, int64_t C, int64_t HW, ChannelSums& sums, const Sum& sum, const Finish& finish,
                const Apply& apply) {
  if (N * C * HW <= g_sample_split_values) {
    sum_over_samples(N, C, HW, sums, sum);
    finish(Chunk{0, C, C * HW});
    for_each_sample_run(N, C, HW, apply);
    return;
  }
  for_each_chunk(N, C, HW, [&](const Chunk& chunk, auto hw) {
    const int64_t per_channel = lanes(hw);
    PositionSums acc(sums.count, chunk.planes() * per_channel, hw);
    for (int64_t n = 0; n < N; ++n) {
      sum(chunk, n, hw, acc);
      acc.end_sample();
    }
    acc.add_to(sums, chunk, per_channel);
    finish(chunk);
    for (int64_t n = 0; n < N; ++n) apply(n, chunk, hw);
  });
}

// The batch statistics (from per-channel sums of x - shift and of its squares) as the affine map
// y = x * alpha + shift of PyTorch's batch-norm kernel, and the running-statistics
// update of torch.nn.functional.batch_norm in training mode (biased variance to
// normalize, unbiased to track).
struct Affine {
  Affine(int64_t C, const at::TensorOptions& options)
      : mean(at::empty({C}, options)), invstd(at::empty({C}, options)), alpha(C), shift(C) {}
  at::Tensor mean, invstd;
  std::vector<float> alpha, shift;
};

// Fills `out` for the channels of `chunk` and updates their running statistics.
void batch_stats(Affine& out, const Chunk& chunk, const ChannelSums& sums, const std::vector<float>& shift,
                 int64_t M, double eps, double momentum, const at::Tensor& gamma, const at::Tensor& beta,
                 const at::Tensor& running_mean, const at::Tensor& running_var) {
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  for (int64_t c = chunk.c0; c < chunk.c1; ++c) {
    const double shifted_mean = sums.get(c, 0) / M;
    const double var = std::max(0.0, sums.get(c, 1) / M - shifted_mean * shifted_mean);
    const double mean = shifted_mean + shift[c];
    rm[c] = static_cast<float>(momentum * mean + (1.0 - momentum) * rm[c]);
    rv[c] = static_cast<float>(momentum * var * M / (M - 1) + (1.0 - momentum) * rv[c]);
    const float invstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    out.mean.data_ptr<float>()[c] = static_cast<float>(mean);
    out.invstd.data_ptr<float>()[c] = invstd;
    out.alpha[c] = invstd * gamma.data_ptr<float>()[c];
    out.shift[c] = beta.data_ptr<float>()[c] - static_cast<float>(mean) * out.alpha[c];
  }
}

// The batch-norm backward's per-channel results for channel c, from its sums
// {sum of dy, sum of dy * (x - mean)}: grad_beta, grad_gamma, and the coefficients
// mean(dy) and mean(dy * (x - mean)) * invstd^2 of the input gradient.
void norm_backward_coefficients(int64_t c, const ChannelSums& sums, const float* invstd, int64_t M,
                                const at::Tensor& grad_gamma, const at::Tensor& grad_beta, std::vector<float>& mean_dy,
                                std::vector<float>& k) {
  const double sum_dy = sums.get(c, 0), dot = sums.get(c, 1);
  grad_beta.data_ptr<float>()[c] = static_cast<float>(sum_dy);
  grad_gamma.data_ptr<float>()[c] = static_cast<float>(dot * invstd[c]);
  mean_dy[c] = static_cast<float>(sum_dy / M);
  k[c] = static_cast<float>(dot / M * invstd[c] * invstd[c]);
}

// The slope per channel, or ones without PReLU: the loops read it either way.
std::vector<float> slope_or_ones(const at::Tensor& slope, bool act, int64_t C) {
  return act ? std::vector<float>(slope.data_ptr<float>(), slope.data_ptr<float>() + C) : std::vector<float>(C, 1.0f);
}

// prelu(x * alpha + shift): bn_prelu_forward's output value. The gated kernels recompute it
// from bn_prelu_forward's input where the tail does not store it (b_affine): one expression
// for both, so that it compiles to the same operations (the same contraction into FMAs) and
// gives the same bits. A slope of 1 with act (the affine of a batch norm without PReLU)
// gives z itself, as act = false does.
inline float affine_prelu(float x, float alpha, float shift, float slope, bool act) {
  const float z = x * alpha + shift;
  return (act && !(z > 0.0f)) ? slope * z : z;
}

// b at value j of plane q (channel chunk.c0 + q): stored (Recompute false), or recomputed
// from bn_prelu_forward's input with the channels' alpha, shift and slope (b_affine; slope
// 1 without PReLU).
template <bool Recompute>
inline float b_value(const float* bs, int64_t j, const float* alpha, const float* shift, const float* slope,
                     int64_t q) {
  if constexpr (Recompute) {
    return affine_prelu(bs[j], alpha[q], shift[q], slope[q], true);
  } else {
    return bs[j];
  }
}

// A per-thread buffer of at least `values` floats (contents undefined), reused across calls.
inline float* scratch_buffer(int64_t values) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < values) buffer.resize(values);
  return buffer.data();
}

}  // namespace

namespace {

// bn_prelu_forward, and with write_output false bn_prelu_statistics: y is not stored (the
// pooled means are taken from a buffer of one sample's chunk). Returns {y (or empty),
// mean[C], invstd[C], pooled[N, C, 1, 1] (or empty)}, and without write_output also
// affine[3, C]: the per-channel alpha, shift and slope (1 without PReLU) of
// y = affine_prelu(x, ...).
std::vector<at::Tensor> bn_prelu_pass(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                      const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                                      double eps, const at::Tensor& slope, bool want_pooled, bool write_output) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  TORCH_CHECK(M > 1, "batch norm in training needs more than one value per channel");
  check_vector(gamma, C, "gamma");
  check_vector(beta, C, "beta");
  check_vector(running_mean, C, "running_mean");
  check_vector(running_var, C, "running_var");
  const bool act = slope.numel() > 0;
  if (act) check_vector(slope, C, "slope");
  auto y = write_output ? at::empty_like(x) : at::empty({0}, x.options());
  auto pooled = want_pooled ? at::empty({N, C, 1, 1}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = write_output ? y.data_ptr<float>() : nullptr;
  float* pp = want_pooled ? pooled.data_ptr<float>() : nullptr;
  // Sums of x - k with k = x[0, c, 0, 0]: a shift near the data keeps the variance
  // (mean of squares minus squared mean) from cancelling when |mean| >> std.
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = xp[c * HW];
  ChannelSums sums(C, 2);
  Affine affine(C, gamma.options());
  const std::vector<float> slopes = slope_or_ones(slope, act, C);
  const auto statistics = [&](const Chunk& chunk, int64_t n, auto HW, auto& acc) {
    const float* k = shift.data() + chunk.c0;
    float* sum = acc.partial(0);
    float* sum_sq = acc.partial(1);
    const float* src = xp + chunk.offset(n, C, HW);
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
      const float v = src[j] - k[q];
      sum[slot] += v;
      sum_sq[slot] += v * v;
    });
  };
  const auto finish = [&](const Chunk& chunk) {
    batch_stats(affine, chunk, sums, shift, M, eps, momentum, gamma, beta, running_mean, running_var);
  };
  const auto output = [&](int64_t n, const Chunk& chunk, auto HW) {
    if (!write_output && !want_pooled) return;
    const float* alpha = affine.alpha.data() + chunk.c0;
    const float* beta = affine.shift.data() + chunk.c0;
    const float* w = slopes.data() + chunk.c0;
    const float* src = xp + chunk.offset(n, C, HW);
    // Without y, the sample's chunk goes to a buffer, for the means.
    float* dst = write_output ? yp + chunk.offset(n, C, HW) : scratch_buffer(chunk.length);
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
      const float alpha_q = alpha[q], beta_q = beta[q], slope_q = w[q];  // loads outside the select: it vectorizes
      dst[j] = affine_prelu(src[j], alpha_q, beta_q, slope_q, act);
    });
    if (want_pooled) plane_sums(dst, chunk.planes(), HW, static_cast<double>(HW), pp + n * C + chunk.c0);
  };
  two_passes(N, C, HW, sums, statistics, finish, output);
  if (write_output) return {y, affine.mean, affine.invstd, pooled};
  auto coefficients = at::empty({3, C}, x.options());  // for the kernels that recompute y
  float* cp = coefficients.data_ptr<float>();
  std::copy(affine.alpha.begin(), affine.alpha.end(), cp);
  std::copy(affine.shift.begin(), affine.shift.end(), cp + C);
  std::copy(slopes.begin(), slopes.end(), cp + 2 * C);
  return {y, affine.mean, affine.invstd, pooled, coefficients};
}

}  // namespace

// y = prelu(batch_norm(x)) with batch statistics (slope empty: no PReLU), and, when
// want_pooled, the spatial mean of y per (sample, channel). Returns
// {y, mean[C], invstd[C], pooled[N, C, 1, 1] (or empty)}; running statistics are updated in place.
std::vector<at::Tensor> bn_prelu_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& running_mean, const at::Tensor& running_var,
                                         double momentum, double eps, const at::Tensor& slope, bool want_pooled) {
  return bn_prelu_pass(x, gamma, beta, running_mean, running_var, momentum, eps, slope, want_pooled, true);
}

// bn_prelu_forward without storing y, which the gated kernels recompute from x (their
// b_affine): {mean[C], invstd[C], pooled[N, C, 1, 1], affine[3, C]}. The pooled means are
// those of bn_prelu_forward's y, the same bits.
std::vector<at::Tensor> bn_prelu_statistics(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                            const at::Tensor& running_mean, const at::Tensor& running_var,
                                            double momentum, double eps, const at::Tensor& slope) {
  auto out = bn_prelu_pass(x, gamma, beta, running_mean, running_var, momentum, eps, slope, true, false);
  return {out[1], out[2], out[3], out[4]};
}

// Gradients of bn_prelu_forward: grad_y (and grad_pooled[N, C], or empty) in;
// {grad_x, grad_gamma, grad_beta, grad_slope (or empty)} out.
std::vector<at::Tensor> bn_prelu_backward(const at::Tensor& grad_y, const at::Tensor& grad_pooled, const at::Tensor& x,
                                          const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& slope,
                                          const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  check_activation(x, "x");
  check_activation(grad_y, "grad_y");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have the shape of x");
  const bool act = slope.numel() > 0;
  const bool has_pooled = grad_pooled.numel() > 0;
  if (has_pooled) TORCH_CHECK(grad_pooled.is_contiguous() && grad_pooled.numel() == N * C, "grad_pooled must be N x C");
  auto grad_x = at::empty_like(x);
  auto grad_gamma = at::empty({C}, x.options());
  auto grad_beta = at::empty({C}, x.options());
  auto grad_slope = act ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* mean = save_mean.data_ptr<float>();
  const float* invstd = save_invstd.data_ptr<float>();
  const std::vector<float> slopes = slope_or_ones(slope, act, C);
  std::vector<float> alpha(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = invstd[c] * gamma.data_ptr<float>()[c];
    shift[c] = beta.data_ptr<float>()[c] - mean[c] * alpha[c];
  }
  // The pooled mean's gradient, grad_pooled / (H*W), reaches every value of its plane.
  std::vector<float> extra(N * C, 0.0f);
  if (has_pooled) {
    const float* gpool = grad_pooled.data_ptr<float>();
    for (int64_t p = 0; p < N * C; ++p) extra[p] = gpool[p] / static_cast<float>(HW);
  }
  // Pass 1: the gradient reaching the batch-norm output (through PReLU), its sum and
  // its dot product with the centred input; the PReLU slope's gradient.
  ChannelSums sums(C, 3);
  const auto gradient_sums = [&](const Chunk& chunk, int64_t n, auto HW, auto& acc) {
    const float* a = alpha.data() + chunk.c0;
    const float* b = shift.data() + chunk.c0;
    const float* m = mean + chunk.c0;
    const float* w = slopes.data() + chunk.c0;
    float* sum_dz = acc.partial(0);
    float* dot = acc.partial(1);
    float* dw = acc.partial(2);
    const float* e = extra.data() + n * C + chunk.c0;
    const float* src = xp + chunk.offset(n, C, HW);
    const float* gy = gp + chunk.offset(n, C, HW);
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
      const float z = src[j] * a[q] + b[q], slope_q = w[q];
      const float dy = gy[j] + e[q];
      const bool negative = act && !(z > 0.0f);
      const float dz = negative ? slope_q * dy : dy;
      sum_dz[slot] += dz;
      dot[slot] += dz * (src[j] - m[q]);
      dw[slot] += negative ? dy * z : 0.0f;
    });
  };
  std::vector<float> mean_dz(C), k(C);
  const auto finish = [&](const Chunk& chunk) {
    for (int64_t c = chunk.c0; c < chunk.c1; ++c) {
      norm_backward_coefficients(c, sums, invstd, M, grad_gamma, grad_beta, mean_dz, k);
      if (act) grad_slope.data_ptr<float>()[c] = static_cast<float>(sums.get(c, 2));
    }
  };
  // Pass 2: dx = gamma * invstd * (dz - mean(dz) - (x - mean) * mean(dz * (x - mean)) * invstd^2).
  float* gxp = grad_x.data_ptr<float>();
  const auto input_gradient = [&](int64_t n, const Chunk& chunk, auto HW) {
    const float* a = alpha.data() + chunk.c0;
    const float* b = shift.data() + chunk.c0;
    const float* m = mean + chunk.c0;
    const float* w = slopes.data() + chunk.c0;
    const float* md = mean_dz.data() + chunk.c0;
    const float* kc = k.data() + chunk.c0;
    const float* e = extra.data() + n * C + chunk.c0;
    const float* src = xp + chunk.offset(n, C, HW);
    const float* gy = gp + chunk.offset(n, C, HW);
    float* dst = gxp + chunk.offset(n, C, HW);
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
      const float z = src[j] * a[q] + b[q], slope_q = w[q];
      const float dy = gy[j] + e[q];
      const float dz = (act && !(z > 0.0f)) ? slope_q * dy : dy;
      dst[j] = (dz - md[q] - (src[j] - m[q]) * kc[q]) * a[q];
    });
  };
  two_passes(N, C, HW, sums, gradient_sums, finish, input_gradient);
  return {grad_x, grad_gamma, grad_beta, grad_slope};
}

namespace {

// gated_bn_forward with b stored or (Recompute) recomputed from b_affine.
template <bool Recompute>
std::vector<at::Tensor> gated_bn_forward_impl(const at::Tensor& b, const at::Tensor& gate, const at::Tensor& r,
                                              bool multiply_residual, const at::Tensor& gamma, const at::Tensor& beta,
                                              const at::Tensor& running_mean, const at::Tensor& running_var,
                                              double momentum, double eps, const float* b_affine) {
  check_activation(b, "b");
  check_activation(r, "residual");
  TORCH_CHECK(r.sizes() == b.sizes(), "the residual must have the shape of b");
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3), M = N * HW;
  TORCH_CHECK(M > 1, "batch norm in training needs more than one value per channel");
  TORCH_CHECK(gate.is_contiguous() && gate.scalar_type() == at::kFloat && gate.numel() == N * C, "gate must hold N x C values");
  check_vector(gamma, C, "gamma");
  check_vector(beta, C, "beta");
  check_vector(running_mean, C, "running_mean");
  check_vector(running_var, C, "running_var");
  auto y = at::empty_like(b);
  const float* bp = b.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* gtp = gate.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // b's alpha, shift and slope rows (unused when b is stored).
  const float *ba = b_affine, *bsh = b_affine + C, *bw = b_affine + 2 * C;
  std::vector<float> shift(C);  // as in bn_prelu_forward: sums of v - v[0, c, 0, 0]
  for (int64_t c = 0; c < C; ++c) {
    const float b0 = b_value<Recompute>(bp, c * HW, ba, bsh, bw, c);
    shift[c] = multiply_residual ? (gtp[c] * b0) * rp[c * HW] : gtp[c] * b0;
  }
  ChannelSums sums(C, 2);
  Affine affine(C, gamma.options());
  const auto statistics = [&](const Chunk& chunk, int64_t n, auto HW, auto& acc) {
    const float* k = shift.data() + chunk.c0;
    float* sum = acc.partial(0);
    float* sum_sq = acc.partial(1);
    const float* s = gtp + n * C + chunk.c0;
    const float* bs = bp + chunk.offset(n, C, HW);
    const float* rs = rp + chunk.offset(n, C, HW);
    const float *a1 = ba + chunk.c0, *s1 = bsh + chunk.c0, *w1 = bw + chunk.c0;
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
      const float bj = b_value<Recompute>(bs, j, a1, s1, w1, q);
      const float v = (multiply_residual ? (s[q] * bj) * rs[j] : s[q] * bj) - k[q];
      sum[slot] += v;
      sum_sq[slot] += v * v;
    });
  };
  const auto finish = [&](const Chunk& chunk) {
    batch_stats(affine, chunk, sums, shift, M, eps, momentum, gamma, beta, running_mean, running_var);
  };
  const auto output = [&](int64_t n, const Chunk& chunk, auto HW) {
    const float* alpha = affine.alpha.data() + chunk.c0;
    const float* beta = affine.shift.data() + chunk.c0;
    const float* s = gtp + n * C + chunk.c0;
    const float* bs = bp + chunk.offset(n, C, HW);
    const float* rs = rp + chunk.offset(n, C, HW);
    const float *a1 = ba + chunk.c0, *s1 = bsh + chunk.c0, *w1 = bw + chunk.c0;
    float* dst = yp + chunk.offset(n, C, HW);
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
      const float bj = b_value<Recompute>(bs, j, a1, s1, w1, q);
      const float v = multiply_residual ? (s[q] * bj) * rs[j] : s[q] * bj;
      dst[j] = (v * alpha[q] + beta[q]) + rs[j];
    });
  };
  two_passes(N, C, HW, sums, statistics, finish, output);
  return {y, affine.mean, affine.invstd};
}

// Gradients of gated_bn_forward_impl: {grad_b, grad_gate (the gate's shape), grad_r, grad_gamma, grad_beta}.
// Without multiply_residual, grad_r is grad_y itself and is returned empty (the caller passes grad_y on).
template <bool Recompute>
std::vector<at::Tensor> gated_bn_backward_impl(const at::Tensor& grad_y, const at::Tensor& b, const at::Tensor& gate,
                                               const at::Tensor& r, bool multiply_residual, const at::Tensor& gamma,
                                               const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                               const float* b_affine) {
  check_activation(b, "b");
  const int64_t gy_stride = sample_stride(grad_y, b, "grad_y");
  check_activation(r, "residual");
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3), M = N * HW;
  auto grad_b = at::empty_like(b);
  auto grad_r = multiply_residual ? at::empty_like(r) : at::empty({0}, b.options());
  auto grad_gate = at::empty(gate.sizes(), b.options());  // N x C or N x C x 1 x 1, as the gate
  auto grad_gamma = at::empty({C}, b.options());
  auto grad_beta = at::empty({C}, b.options());
  const float* bp = b.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* gtp = gate.data_ptr<float>();
  const float* mean = save_mean.data_ptr<float>();
  const float* invstd = save_invstd.data_ptr<float>();
  const float *ba = b_affine, *bsh = b_affine + C, *bw = b_affine + 2 * C;  // unused when b is stored
  ChannelSums sums(C, 2);
  const auto gradient_sums = [&](const Chunk& chunk, int64_t n, auto HW, auto& acc) {
    const float* m = mean + chunk.c0;
    float* sum_dy = acc.partial(0);
    float* dot = acc.partial(1);
    const float* s = gtp + n * C + chunk.c0;
    const float* bs = bp + chunk.offset(n, C, HW);
    const float* rs = rp + chunk.offset(n, C, HW);
    const float* gy = gp + n * gy_stride + chunk.c0 * HW;
    const float *a1 = ba + chunk.c0, *s1 = bsh + chunk.c0, *w1 = bw + chunk.c0;
    for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
      const float bj = b_value<Recompute>(bs, j, a1, s1, w1, q);
      const float v = multiply_residual ? (s[q] * bj) * rs[j] : s[q] * bj;
      sum_dy[slot] += gy[j];
      dot[slot] += gy[j] * (v - m[q]);
    });
  };
  std::vector<float> alpha(C), mean_dy(C), k(C);
  const auto finish = [&](const Chunk& chunk) {
    for (int64_t c = chunk.c0; c < chunk.c1; ++c) {
      norm_backward_coefficients(c, sums, invstd, M, grad_gamma, grad_beta, mean_dy, k);
      alpha[c] = invstd[c] * gamma.data_ptr<float>()[c];
    }
  };
  float* gbp = grad_b.data_ptr<float>();
  float* grp = multiply_residual ? grad_r.data_ptr<float>() : nullptr;
  float* ggp = grad_gate.data_ptr<float>();
  const auto input_gradients = [&](int64_t n, const Chunk& chunk, auto HW) {
    const float* a = alpha.data() + chunk.c0;
    const float* m = mean + chunk.c0;
    const float* md = mean_dy.data() + chunk.c0;
    const float* kc = k.data() + chunk.c0;
    float* dgate = scratch_buffer(chunk.length);  // each value's share of its plane's gate gradient
    const float *a1 = ba + chunk.c0, *s1 = bsh + chunk.c0, *w1 = bw + chunk.c0;
    const float* s = gtp + n * C + chunk.c0;
    const float* bs = bp + chunk.offset(n, C, HW);
    const float* rs = rp + chunk.offset(n, C, HW);
    const float* gy = gp + n * gy_stride + chunk.c0 * HW;
    float* gb = gbp + chunk.offset(n, C, HW);
    if (multiply_residual) {
      float* gr = grp + chunk.offset(n, C, HW);
      for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
        const float bj = b_value<Recompute>(bs, j, a1, s1, w1, q);
        const float sb = s[q] * bj;
        const float dv = (gy[j] - md[q] - (sb * rs[j] - m[q]) * kc[q]) * a[q];
        const float dsb = dv * rs[j];  // gradient reaching s * b
        gb[j] = dsb * s[q];
        gr[j] = gy[j] + dv * sb;
        dgate[j] = dsb * bj;
      });
    } else {
      for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
        const float bj = b_value<Recompute>(bs, j, a1, s1, w1, q);
        const float dv = (gy[j] - md[q] - (s[q] * bj - m[q]) * kc[q]) * a[q];
        gb[j] = dv * s[q];
        dgate[j] = dv * bj;
      });
    }
    plane_sums(dgate, chunk.planes(), HW, 1.0, ggp + n * C + chunk.c0);
  };
  two_passes(N, C, HW, sums, gradient_sums, finish, input_gradients);
  return {grad_b, grad_gate, grad_r, grad_gamma, grad_beta};
}

// b's per-channel alpha, shift and slope rows (bn_prelu_statistics' affine), or nullptr.
const float* b_affine_rows(const std::optional<at::Tensor>& b_affine, int64_t C) {
  if (!b_affine.has_value()) return nullptr;
  TORCH_CHECK(b_affine->device().is_cpu() && b_affine->scalar_type() == at::kFloat && b_affine->is_contiguous() &&
                  b_affine->dim() == 2 && b_affine->size(0) == 3 && b_affine->size(1) == C,
              "b_affine must be a contiguous float32 CPU tensor of 3 x ", C, " values");
  return b_affine->data_ptr<float>();
}

}  // namespace

// y = batch_norm(v) + r with v = (gate * b) [* r] and gate per (sample, channel).
// With b_affine (bn_prelu_statistics' affine), the first tensor is instead bn_prelu_forward's
// input x, and b = prelu(batch_norm(x)) is recomputed from it (the same bits as the stored
// b): the tail then never writes b, and its backward reads x in b's place.
// Returns {y, mean[C], invstd[C]}; running statistics are updated in place.
std::vector<at::Tensor> gated_bn_forward(const at::Tensor& b, const at::Tensor& gate, const at::Tensor& r,
                                         bool multiply_residual, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& running_mean, const at::Tensor& running_var,
                                         double momentum, double eps, const std::optional<at::Tensor>& b_affine) {
  check_activation(b, "b");
  const float* rows = b_affine_rows(b_affine, b.size(1));
  if (rows) {
    return gated_bn_forward_impl<true>(b, gate, r, multiply_residual, gamma, beta, running_mean, running_var,
                                       momentum, eps, rows);
  }
  const std::vector<float> unused(3 * b.size(1));  // rows the stored-b loops do not read
  return gated_bn_forward_impl<false>(b, gate, r, multiply_residual, gamma, beta, running_mean, running_var, momentum,
                                      eps, unused.data());
}

// Gradients of gated_bn_forward (b or, with b_affine, x as there).
std::vector<at::Tensor> gated_bn_backward(const at::Tensor& grad_y, const at::Tensor& b, const at::Tensor& gate,
                                          const at::Tensor& r, bool multiply_residual, const at::Tensor& gamma,
                                          const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                          const std::optional<at::Tensor>& b_affine) {
  check_activation(b, "b");
  const float* rows = b_affine_rows(b_affine, b.size(1));
  if (rows) {
    return gated_bn_backward_impl<true>(grad_y, b, gate, r, multiply_residual, gamma, save_mean, save_invstd, rows);
  }
  const std::vector<float> unused(3 * b.size(1));  // rows the stored-b loops do not read
  return gated_bn_backward_impl<false>(grad_y, b, gate, r, multiply_residual, gamma, save_mean, save_invstd,
                                       unused.data());
}

// What a processor reads from its input x, in one pass: sign(x + bias) per channel
// (sign(0) = 0 as torch.sign); when want_mean, the spatial mean of x per (sample,
// channel); when slope is given, prelu(x, slope) (ELM attention's real shortcut).
// Returns {signs, mean[N, C, 1, 1] (or empty), prelu(x) (or empty)}.
std::vector<at::Tensor> biased_sign_forward(const at::Tensor& x, const at::Tensor& bias, bool want_mean,
                                            const at::Tensor& slope) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  check_vector(bias, C, "bias");
  const bool act = slope.numel() > 0;
  if (act) check_vector(slope, C, "slope");
  auto y = at::empty_like(x);
  auto mean = want_mean ? at::empty({N, C, 1, 1}, x.options()) : at::empty({0}, x.options());
  auto activated = act ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* mp = want_mean ? mean.data_ptr<float>() : nullptr;
  float* ap = act ? activated.data_ptr<float>() : nullptr;
  const std::vector<float> slopes = slope_or_ones(slope, act, C);
  for_each_sample_run(N, C, HW, [&](int64_t n, const Chunk& chunk, auto HW) {
    const float* beta = bias.data_ptr<float>() + chunk.c0;
    const float* w = slopes.data() + chunk.c0;
    const float* src = xp + chunk.offset(n, C, HW);
    float* dst = yp + chunk.offset(n, C, HW);
    if (act) {
      float* out = ap + chunk.offset(n, C, HW);
      for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
        const float x_j = src[j], v = x_j + beta[q], slope_q = w[q];
        dst[j] = static_cast<float>((0.0f < v) - (v < 0.0f));
        out[j] = x_j > 0.0f ? x_j : slope_q * x_j;
      });
    } else {
      for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t) {
        const float v = src[j] + beta[q];
        dst[j] = static_cast<float>((0.0f < v) - (v < 0.0f));
      });
    }
    if (want_mean) plane_sums(src, chunk.planes(), HW, static_cast<double>(HW), mp + n * C + chunk.c0);
  });
  return {y, mean, activated};
}

// Gradients of biased_sign_forward. The sign's straight-through gradient passes where
// -clip <= x + bias <= clip (as hardtanh_backward with bounds just outside +-clip);
// grad_mean / (H*W) and the PReLU's gradient are added when given (empty otherwise).
// grad_shortcut, when given, is the gradient of x reaching it by another path (a
// binary FFN's residual): it is added last, as autograd would add the two gradients,
// so that x's gradient takes one pass instead of this kernel's and autograd's addition.
// Returns {grad_x, grad_bias, grad_slope (or empty)}.
std::vector<at::Tensor> biased_sign_backward(const at::Tensor& grad_y, const at::Tensor& grad_mean,
                                             const at::Tensor& grad_activated, const at::Tensor& x,
                                             const at::Tensor& bias, const at::Tensor& slope, double clip,
                                             const std::optional<at::Tensor>& grad_shortcut) {
  check_activation(x, "x");
  check_activation(grad_y, "grad_y");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  check_vector(bias, C, "bias");
  const bool has_mean = grad_mean.numel() > 0;
  if (has_mean) TORCH_CHECK(grad_mean.is_contiguous() && grad_mean.numel() == N * C, "grad_mean must be N x C");
  const bool act = grad_activated.numel() > 0;
  if (act) {
    check_activation(grad_activated, "grad_activated");
    check_vector(slope, C, "slope");
  }
  const bool has_shortcut = grad_shortcut.has_value() && grad_shortcut->numel() > 0;
  int64_t gs_stride = 0;
  if (has_shortcut) gs_stride = sample_stride(*grad_shortcut, x, "grad_shortcut");
  auto grad_x = at::empty_like(x);
  auto grad_bias = at::empty({C}, x.options());
  auto grad_slope = act ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* gap = act ? grad_activated.data_ptr<float>() : nullptr;
  const float* gsp = has_shortcut ? grad_shortcut->data_ptr<float>() : nullptr;
  float* gxp = grad_x.data_ptr<float>();
  const std::vector<float> slopes = slope_or_ones(slope, act, C);
  // The mean's gradient, grad_mean / (H*W), reaches every value of its plane.
  std::vector<float> extra(N * C, 0.0f);
  if (has_mean) {
    const float* gmp = grad_mean.data_ptr<float>();
    for (int64_t p = 0; p < N * C; ++p) extra[p] = gmp[p] / static_cast<float>(HW);
  }
  const float lo = static_cast<float>(-clip), hi = static_cast<float>(clip);
  ChannelSums sums(C, 2);
  // with_shortcut is a compile-time flag: a load under a run-time condition would keep
  // the loops from vectorizing (see for_each_value).
  const auto run = [&](auto with_shortcut) {
    constexpr bool kShortcut = decltype(with_shortcut)::value;
    sum_over_samples(N, C, HW, sums, [&](const Chunk& chunk, int64_t n, auto HW, const GroupSums& acc) {
      const float* beta = bias.data_ptr<float>() + chunk.c0;
      const float* w = slopes.data() + chunk.c0;
      float* sum = acc.partial(0);
      float* dw = acc.partial(1);
      const float* e = extra.data() + n * C + chunk.c0;
      const float* src = xp + chunk.offset(n, C, HW);
      const float* gy = gp + chunk.offset(n, C, HW);
      const float* gs = kShortcut ? gsp + n * gs_stride + chunk.c0 * HW : nullptr;
      float* dst = gxp + chunk.offset(n, C, HW);
      if (act) {
        const float* ga = gap + chunk.offset(n, C, HW);
        for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
          const float x_j = src[j], v = x_j + beta[q], grad_j = gy[j], ga_j = ga[j], slope_q = w[q];
          const float g = (v < lo || v > hi) ? 0.0f : grad_j;
          const bool positive = x_j > 0.0f;
          const float own = (g + e[q]) + (positive ? ga_j : slope_q * ga_j);
          if constexpr (kShortcut) {
            dst[j] = own + gs[j];
          } else {
            dst[j] = own;
          }
          sum[slot] += g;
          dw[slot] += positive ? 0.0f : ga_j * x_j;
        });
      } else {
        for_each_value(chunk.planes(), HW, [=](int64_t j, int64_t q, int64_t slot) {
          const float v = src[j] + beta[q], grad_j = gy[j];
          const float g = (v < lo || v > hi) ? 0.0f : grad_j;
          if constexpr (kShortcut) {
            dst[j] = (g + e[q]) + gs[j];
          } else {
            dst[j] = g + e[q];
          }
          sum[slot] += g;
        });
      }
    });
  };
  if (has_shortcut) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  for (int64_t c = 0; c < C; ++c) {
    grad_bias.data_ptr<float>()[c] = static_cast<float>(sums.get(c, 0));
    if (act) grad_slope.data_ptr<float>()[c] = static_cast<float>(sums.get(c, 1));
  }
  return {grad_x, grad_bias, grad_slope};
}

// avg_pool2d(x, 2, 2) (floor mode): ((a + b) + c) + d over each window in the order of
// PyTorch's pooling kernel, times 0.25 (exactly / 4), so the same bits.
at::Tensor pool_2x2_forward(const at::Tensor& x) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = H / 2, Wo = W / 2;
  TORCH_CHECK(Ho > 0 && Wo > 0, "2x2 pooling needs H, W >= 2");
  auto y = at::empty({N, C, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_plane(N * C, H * W, [&](int64_t p) {
    for (int64_t i = 0; i < Ho; ++i) {
      const float* top = xp + p * H * W + 2 * i * W;
      const float* bottom = top + W;
      float* dst = yp + p * Ho * Wo + i * Wo;
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) {
        dst[j] = (((top[2 * j] + top[2 * j + 1]) + bottom[2 * j]) + bottom[2 * j + 1]) * 0.25f;
      }
    }
  });
  return y;
}

#if defined(__AVX512F__)
// pool_2x2_backward for planes of even height whose width W lets every 16 values of the
// input's gradient come from one vector of pooled values, spread by one permutation: W = 4
// (two pairs of rows from 4 values), W = 8 (a pair of rows from 4) or a multiple of 16 (16
// values of a row from 8). Returns false, writing nothing, for other sizes. GCC's own code
// for the plain loop's interleaved stores was 1.4 to 1.5 times slower in training steps. Streamed
// stores (store_line) made this kernel faster still, but the sign kernel's backward, which
// reads the result next, slower by as much.
bool spread_2x2_by_permutations(const float* gp, float* gxp, int64_t planes, int64_t H, int64_t W) {
  if (H % 2 || !(W == 4 || W == 8 || W % 16 == 0)) return false;
  const int64_t Ho = H / 2, Wo = W / 2;
  const __m512 quarter = _mm512_set1_ps(0.25f);
  // Output lane k takes value index[k] of the pooled values loaded (lanes listed from 15 down).
  const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_of_4 = _mm512_set_epi32(3, 3, 2, 2, 3, 3, 2, 2, 1, 1, 0, 0, 1, 1, 0, 0);
  const __m512i rows_of_8 = _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0);
  const auto spread = [&](const float* g, __mmask16 count, __m512i index) {
    return _mm512_permutexvar_ps(index, _mm512_mul_ps(_mm512_maskz_loadu_ps(count, g), quarter));
  };
  for_each_plane(planes, H * W, [&](int64_t p) {
    const float* g = gp + p * Ho * Wo;
    float* plane = gxp + p * H * W;
    if (W == 4) {
      int64_t i = 0;
      for (; i + 1 < Ho; i += 2) _mm512_storeu_ps(plane + i * 2 * W, spread(g + i * Wo, 0x000F, rows_of_4));
      if (i < Ho) _mm512_mask_storeu_ps(plane + i * 2 * W, 0x00FF, spread(g + i * Wo, 0x0003, rows_of_4));
    } else if (W == 8) {
      for (int64_t i = 0; i < Ho; ++i) _mm512_storeu_ps(plane + i * 2 * W, spread(g + i * Wo, 0x000F, rows_of_8));
    } else {
      for (int64_t i = 0; i < Ho; ++i) {
        float* top = plane + 2 * i * W;
        for (int64_t j = 0; j < Wo; j += 8) {
          const __m512 values = spread(g + i * Wo + j, 0x00FF, pairs);
          _mm512_storeu_ps(top + 2 * j, values);
          _mm512_storeu_ps(top + W + 2 * j, values);
        }
      }
    }
  });
  return true;
}
#endif

// Gradient of pool_2x2_forward for an H x W input: grad / 4 on each value of its
// window; an odd last row or column gets zero, as with avg_pool2d's floor.
at::Tensor pool_2x2_backward(const at::Tensor& grad, int64_t H, int64_t W) {
  check_activation(grad, "grad");
  const int64_t N = grad.size(0), C = grad.size(1), Ho = grad.size(2), Wo = grad.size(3);
  TORCH_CHECK(H / 2 == Ho && W / 2 == Wo, "the gradient's size does not match an H x W input pooled by 2");
  auto grad_x = at::empty({N, C, H, W}, grad.options());
  const float* gp = grad.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
#if defined(__AVX512F__)
  if (spread_2x2_by_permutations(gp, gxp, N * C, H, W)) return grad_x;
#endif
  for_each_plane(N * C, H * W, [&](int64_t p) {
    float* plane = gxp + p * H * W;
    for (int64_t i = 0; i < Ho; ++i) {
      const float* g = gp + p * Ho * Wo + i * Wo;
      float* top = plane + 2 * i * W;
      float* bottom = top + W;
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) {
        const float v = g[j] * 0.25f;
        top[2 * j] = v;
        top[2 * j + 1] = v;
        bottom[2 * j] = v;
        bottom[2 * j + 1] = v;
      }
      if (W % 2) top[W - 1] = bottom[W - 1] = 0.0f;
    }
    if (H % 2) std::fill(plane + (H - 1) * W, plane + H * W, 0.0f);
  });
  return grad_x;
}

// The recoupling gate's kernels read every tensor as plain float32 values.
void check_gate_tensors(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "the gate's tensors must be contiguous float32 CPU tensors");
  }
}

// The info-recoupling gate of N samples and C channels from the spatial means of the mix
// and of b (N x C values each): gate = sigmoid(W2 relu(W1 p + b1) + b2) on the mixed means
// p = g * mix + (1 - g) * b_mean, with g one value per channel. The products and the
// sigmoid are ATen's (F.linear of a 2-D input is addmm: the same bits as the module path);
// the mix is the module path's multiplications and addition, rounded one by one. Returns
// {gate N x C, 1 - g, p, relu output}, the last three for the backward. Each of these small
// tensor operations cost more from Python than its arithmetic (31 gates per BNext-T step).
std::vector<at::Tensor> recoupling_gate_forward(const at::Tensor& scale, const at::Tensor& mix_mean,
                                                const at::Tensor& b_mean, const at::Tensor& w1, const at::Tensor& b1,
                                                const at::Tensor& w2, const at::Tensor& b2) {
  const int64_t N = b_mean.size(0), C = b_mean.size(1), H = w1.size(0);
  check_gate_tensors({&scale, &mix_mean, &b_mean, &w1, &b1, &w2, &b2});
  TORCH_CHECK(scale.numel() == C && mix_mean.numel() == N * C && b_mean.numel() == N * C && w1.numel() == H * C &&
                  b1.numel() == H && w2.numel() == C * H && b2.numel() == C,
              "the gate's shapes do not match: scale C, means N x C, W1 H x C, b1 H, W2 C x H, b2 C");
  auto keep = at::empty_like(scale);
  auto pooled = at::empty({N, C}, b_mean.options());
  const float* g = scale.data_ptr<float>();
  const float* mix = mix_mean.data_ptr<float>();
  const float* bm = b_mean.data_ptr<float>();
  float* k = keep.data_ptr<float>();
  float* p = pooled.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) k[c] = 1.0f - g[c];
  for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) p[n * C + c] = g[c] * mix[n * C + c] + k[c] * bm[n * C + c];
  }
  auto hidden = at::addmm(b1, pooled, w1.view({H, C}).t()).relu_();
  auto gate = at::sigmoid(at::addmm(b2, hidden, w2.view({C, H}).t()));
  return {gate, keep, pooled, hidden};
}

// The gradients of recoupling_gate_forward from that of the gate (N x C values): {scale,
// mix_mean, b_mean, w1, b1, w2, b2}, each of its input's shape. The products are ATen's; the
// element-wise steps and the sums over the samples (in double) are loops, so the results
// agree with autograd's to float32 rounding.
std::vector<at::Tensor> recoupling_gate_backward(const at::Tensor& grad_gate, const at::Tensor& gate,
                                                 const at::Tensor& scale, const at::Tensor& mix_mean,
                                                 const at::Tensor& b_mean, const at::Tensor& w1, const at::Tensor& w2,
                                                 const at::Tensor& keep, const at::Tensor& pooled,
                                                 const at::Tensor& hidden) {
  const int64_t N = gate.size(0), C = gate.size(1), H = hidden.size(1);
  check_gate_tensors({&gate, &scale, &mix_mean, &b_mean, &w1, &w2, &keep, &pooled, &hidden});
  TORCH_CHECK(grad_gate.numel() == N * C && grad_gate.scalar_type() == at::kFloat, "grad_gate must hold N x C values");
  TORCH_CHECK(gate.numel() == N * C && scale.numel() == C && keep.numel() == C && mix_mean.numel() == N * C &&
                  b_mean.numel() == N * C && pooled.numel() == N * C && hidden.numel() == N * H &&
                  w1.numel() == H * C && w2.numel() == C * H,
              "the gate's saved tensors do not match: gate N x C, scale and 1 - scale C, means and p N x C, "
              "relu output N x H, W1 H x C, W2 C x H");
  const auto dense = grad_gate.contiguous();
  auto grad_z = at::empty({N, C}, gate.options());
  const float* gg = dense.data_ptr<float>();
  const float* y = gate.data_ptr<float>();
  float* dz = grad_z.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < N * C; ++i) dz[i] = gg[i] * (1.0f - y[i]) * y[i];  // sigmoid's derivative
  auto grad_hidden = at::mm(grad_z, w2.view({C, H}));
  float* dh = grad_hidden.data_ptr<float>();
  const float* h = hidden.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < N * H; ++i) dh[i] = h[i] <= 0.0f ? 0.0f : dh[i];  // relu's, as threshold_backward
  auto grad_pooled = at::mm(grad_hidden, w1.view({H, C}));
  // Sums over the samples, per column of an N x width matrix.
  const auto column_sums = [N](const float* values, int64_t width, float* out) {
    std::vector<double> sums(width, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < width; ++j) sums[j] += values[n * width + j];
    }
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<float>(sums[j]);
  };
  auto grad_b2 = at::empty({C}, gate.options());
  auto grad_b1 = at::empty({H}, gate.options());
  column_sums(dz, C, grad_b2.data_ptr<float>());
  column_sums(dh, H, grad_b1.data_ptr<float>());
  // p = g * mix + (1 - g) * b_mean: d/dg = mix - b_mean (summed over the samples), d/dmix = g, d/db_mean = 1 - g.
  auto grad_scale = at::empty_like(scale);
  auto grad_mix = at::empty_like(mix_mean);
  auto grad_b_mean = at::empty_like(b_mean);
  const float* dp = grad_pooled.data_ptr<float>();
  const float* g = scale.data_ptr<float>();
  const float* k = keep.data_ptr<float>();
  const float* mix = mix_mean.data_ptr<float>();
  const float* bm = b_mean.data_ptr<float>();
  float* dmix = grad_mix.data_ptr<float>();
  float* dbm = grad_b_mean.data_ptr<float>();
  std::vector<double> dg(C, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const float d = dp[n * C + c];
      dg[c] += static_cast<double>(d) * (static_cast<double>(mix[n * C + c]) - bm[n * C + c]);
      dmix[n * C + c] = d * g[c];
      dbm[n * C + c] = d * k[c];
    }
  }
  float* dscale = grad_scale.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) dscale[c] = static_cast<float>(dg[c]);
  return {grad_scale, grad_mix, grad_b_mean, at::mm(grad_hidden.t(), pooled).view_as(w1), grad_b1,
          at::mm(grad_z.t(), hidden).view_as(w2), grad_b2};
}

#if defined(__AVX512F__)
// Stores 16 floats at p, bypassing the caches where p is 64-byte aligned (a whole cache
// line): the binarized weights are written to fresh memory that nothing reads before the
// next step, so an ordinary store would first read every line in (its "read for
// ownership"), a third of the pass's memory traffic. Callers end their work with an sfence.
inline void store_line(float* p, __m512 v) {
  if (reinterpret_cast<std::uintptr_t>(p) % 64 == 0) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

// Transposes the 16x16 floats r (row i in r[i]) in registers: afterwards r[j] holds
// column j.
inline void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
  // Pairs of rows interleaved, then 4x4 blocks within each 128-bit lane...
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // ...then the 128-bit lanes across groups of four rows, and of eight.
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// The 3x3 taps of 16 input channels: 16 rows of 9 floats, row i at src + 9 * i, written
// as 9 rows of 16 floats, row t at dst + t * stride (a 16x16 transpose in registers of
// the rows padded with zeros, of which only the first 9 columns are stored).
inline void transpose_16_by_9(const float* src, float* dst, int64_t stride) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(0x1FF, src + 9 * i);
  transpose_16x16(r);
  for (int t = 0; t < 9; ++t) store_line(dst + t * stride, r[t]);
}

// The inverse: 9 rows of 16 floats, row t at src + t * stride (tap t of 16 input
// channels), written as the 16 channels' 9 taps, 144 consecutive floats at dst. They
// are gathered in a buffer and written as 9 whole cache lines (streamed where dst is
// 64-byte aligned, see store_line).
inline void transpose_9_by_16(const float* src, int64_t stride, float* dst) {
  __m512 r[16];
  for (int t = 0; t < 9; ++t) r[t] = _mm512_loadu_ps(src + t * stride);
  for (int t = 9; t < 16; ++t) r[t] = _mm512_setzero_ps();
  transpose_16x16(r);
  alignas(64) float lines[9 * 16];
  for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(lines + 9 * i, 0x1FF, r[i]);
  for (int j = 0; j < 9; ++j) store_line(dst + 16 * j, _mm512_load_ps(lines + 16 * j));
}
#endif

// Writes binarize(value(i)) for every value i of w into out: in w's layout, or with
// tap_major in the channels-last layout of the Cout x Cin x k x k weight, Cout x (k*k) x
// Cin in memory (the tap matrices of models/tap_conv.py, which then need no transposing
// copy of their own). value(i) may write w[i] (the constraint's clamp).
template <typename Value, typename Binarize>
void write_binarized(const at::Tensor& w, at::Tensor& out, bool tap_major, const Value& value,
                     const Binarize& binarize) {
  float* dst = out.data_ptr<float>();
  if (!tap_major) {
    at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
#if defined(__AVX512F__)
      // Up to a cache line's start, then whole lines streamed (see store_line).
      for (; i < end && reinterpret_cast<std::uintptr_t>(dst + i) % 64 != 0; ++i) dst[i] = binarize(value(i));
      for (; i + 16 <= end; i += 16) {
        alignas(64) float line[16];
#pragma omp simd
        for (int k = 0; k < 16; ++k) line[k] = binarize(value(i + k));
        _mm512_stream_ps(dst + i, _mm512_load_ps(line));
      }
      _mm_sfence();
#endif
#pragma omp simd
      for (int64_t j = i; j < end; ++j) dst[j] = binarize(value(j));
    });
    return;
  }
  // One output channel at a time: its k*k*Cin values (36 KiB for 1024 channels) are
  // binarized in a vectorized pass into a buffer that stays in the L1/L2 cache, from which
  // tap t's row then gathers every k*k-th value (the divisions of a gathering loop do not
  // vectorize: that was slower than the plain layout's pass and the copy it saves together).
  const int64_t taps = w.size(2) * w.size(3), cin = w.size(1), per_out = taps * cin;
  at::parallel_for(0, w.size(0), std::max<int64_t>(1, (1 << 16) / per_out), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(per_out);
    float* values = buffer.data();
#if defined(__AVX512F__)
    const __m512i every_tap = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(static_cast<int>(taps)));  // lane * taps
#endif
    for (int64_t o = begin; o < end; ++o) {
      const int64_t base = o * per_out;
#pragma omp simd
      for (int64_t i = 0; i < per_out; ++i) values[i] = binarize(value(base + i));
      float* row = dst + base;
      int64_t first = 0;  // the channels below it are written
#if defined(__AVX512F__)
      if (taps == 9) {
        for (; first + 16 <= cin; first += 16) transpose_16_by_9(values + first * taps, row + first, cin);
      }
#endif
      for (int64_t t = 0; t < taps; ++t, row += cin) {
        int64_t c = first;
#if defined(__AVX512F__)
        // 16 channels of tap t per gather instruction (GCC's own vectorization of the loop below
        // took 2 values at a time): about a tenth off the pass on the AMD EPYC machine.
        for (; c + 16 <= cin; c += 16) store_line(row + c, _mm512_i32gather_ps(every_tap, values + c * taps + t, 4));
#endif
        for (; c < cin; ++c) row[c] = values[c * taps + t];
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // the streamed lines are visible to the other threads once parallel_for returns
#endif
  });
}

// x / d == x * (1 / d) bit for bit where d is a power of two whose reciprocal is a normal
// float: both are the rounding of the same real number. So the binarization divides only
// by a temperature that is not a power of two (the progressive phase's 0.9^k), and never
// by the second divisor, which is 1 or, below the sign threshold, the smallest normal float
// (as its first). A vector division costs several times a multiplication: 2 to 6 % off
// the passes over BNext-T's weights (benchmarks/fused_kernels_ab.py --weights).
bool exact_reciprocal(float d) {
  int exponent = 0;
  return std::frexp(d, &exponent) == 0.5f && std::isnormal(1.0f / d);
}

// x -> clamp(x / first / second, -1, 1) in float32, the divisions in that order (those by
// a power of two as multiplications, the same bits). Calls fn with the binarizing lambda.
template <typename Fn>
void with_binarizer(double first, double second, const Fn& fn) {
  const float d1 = static_cast<float>(first), d2 = static_cast<float>(second);
  const auto clamp = [](float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); };
  if (!exact_reciprocal(d2)) {
    fn([=](float x) { return clamp((x / d1) / d2); });
  } else if (!exact_reciprocal(d1)) {
    const float r2 = 1.0f / d2;
    fn([=](float x) { return clamp((x / d1) * r2); });
  } else {
    const float r1 = 1.0f / d1, r2 = 1.0f / d2;
    fn([=](float x) { return clamp((x * r1) * r2); });
  }
}

void check_weight(const at::Tensor& w, bool tap_major) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "the weight must be a contiguous float32 CPU tensor");
  TORCH_CHECK(!tap_major || w.dim() == 4, "the tap-major layout needs a 4-D weight");
}

// clamp(w / first / second, -1, 1) in one pass: the progressive weight binarization of
// models/quantizers.py (three passes there), the same operations in the same order.
// NaN stays NaN, as with torch.clamp. With tap_major the result is channels-last (see
// write_binarized).
at::Tensor divide_clamp(const at::Tensor& w, double first, double second, bool tap_major) {
  check_weight(w, tap_major);
  auto out = tap_major ? at::empty_like(w, at::MemoryFormat::ChannelsLast) : at::empty_like(w);
  const float* src = w.data_ptr<float>();
  with_binarizer(first, second, [&](const auto& binarize) {
    write_binarized(w, out, tap_major, [src](int64_t i) { return src[i]; }, binarize);
  });
  return out;
}

// The latent weights' constraint and the next step's binarization in one pass: w is
// clamped to [-clip, clip] in place, as torch.clamp_ (NaN stays NaN), but written only
// where a value is out of range, so that a weight already inside (the usual case) is read
// and not written back; then divide_clamp of the clamped values, the same bits.
at::Tensor clamp_and_divide_clamp(at::Tensor& w, double clip, double first, double second, bool tap_major) {
  check_weight(w, tap_major);
  auto out = tap_major ? at::empty_like(w, at::MemoryFormat::ChannelsLast) : at::empty_like(w);
  float* src = w.data_ptr<float>();
  const float lo = static_cast<float>(-clip), hi = static_cast<float>(clip);
  const auto clamped = [src, lo, hi](int64_t i) {
    const float x = src[i];
    const float c = x < lo ? lo : (x > hi ? hi : x);
    if (x < lo || x > hi) src[i] = c;
    return c;
  };
  with_binarizer(first, second, [&](const auto& binarize) { write_binarized(w, out, tap_major, clamped, binarize); });
  return out;
}

// One AdamW step with the arithmetic of torch's fused CPU AdamW (torch 2.14.1, its AVX-512
// kernel): the scalars as torch makes them, in double, each rounded to float once, and per
// value the same operations, with the one multiply-add torch's compiler fused. Values of a
// tensor's last numel % 16 torch rounds otherwise (its scalar loop): the kernels below take
// only tensors of a multiple of 16 values.
struct AdamWArithmetic {
  AdamWArithmetic(double step, double lr, double beta1, double beta2, double weight_decay, double eps)
      : decay(static_cast<float>(1 - lr * weight_decay)),
        lerp_weight(static_cast<float>(1 - beta1)),  // exp_avg.lerp_(grad, 1 - beta1)
        beta2(static_cast<float>(beta2)),
        grad_sq_weight(static_cast<float>(1 - beta2)),
        neg_step_size(static_cast<float>(-(lr / (1 - std::pow(beta1, step))))),
        bc2_sqrt(static_cast<float>(std::sqrt(1 - std::pow(beta2, step)))),
        eps(static_cast<float>(eps)) {}
  // The updated weight at i; the moments at i are written.
  inline float update(const float* w, const float* g, float* m, float* v, int64_t i) const {
    const float grad = g[i];
    const float m_i = std::fma(lerp_weight, grad - m[i], m[i]);
    const float v_i = std::fma(grad_sq_weight * grad, grad, v[i] * beta2);  // torch's compiler fused this one
    m[i] = m_i;
    v[i] = v_i;
    return w[i] * decay + neg_step_size * m_i / (std::sqrt(v_i) / bc2_sqrt + eps);
  }
  float decay, lerp_weight, beta2, grad_sq_weight, neg_step_size, bc2_sqrt, eps;
};

void check_beta1(double beta1) {
  TORCH_CHECK(beta1 > 0.5 && beta1 < 1.5, "beta1 must lie in (0.5, 1.5): torch's lerp takes another form elsewhere");
}

// One AdamW step of a latent binary weight, then clamp_and_divide_clamp of the updated
// weight, in one pass: the optimizer step and the constraint would each read the weight
// (and the step write it), here its new value goes from registers to the clamp and the
// binarization. The update is the arithmetic of torch's fused CPU AdamW (decoupled weight
// decay, no amsgrad), operation for operation in the same float32 roundings, so the weight
// and both moments come out bit for bit as torch.optim.AdamW(fused=True) and the clamp
// leave them (models/fused_ops.py checks that against torch before it uses this). torch's
// kernel takes 16 values (AVX-512) or 8 (AVX2) per vector instruction, and the last few of a
// tensor whose size is not a multiple of that one at a time, in roundings of their own: so
// the weight must hold a multiple of 16 values. step is the step count after this update.
at::Tensor adamw_clamp_and_divide_clamp(at::Tensor& w, const at::Tensor& grad, at::Tensor& exp_avg,
                                        at::Tensor& exp_avg_sq, double step, double lr, double beta1, double beta2,
                                        double weight_decay, double eps, double clip, double first, double second,
                                        bool tap_major) {
  check_weight(w, tap_major);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == w.sizes(),
                "the gradient and the moments must be contiguous float32 CPU tensors of the weight's shape");
  }
  TORCH_CHECK(w.numel() % 16 == 0, "the weight must hold a multiple of 16 values, got ", w.numel());
  check_beta1(beta1);
  auto out = tap_major ? at::empty_like(w, at::MemoryFormat::ChannelsLast) : at::empty_like(w);
  const AdamWArithmetic adamw(step, lr, beta1, beta2, weight_decay, eps);
  const float lo = static_cast<float>(-clip), hi = static_cast<float>(clip);
  float* wp = w.data_ptr<float>();
  float* mp = exp_avg.data_ptr<float>();
  float* vp = exp_avg_sq.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const auto updated = [=](int64_t i) {
    const float x = adamw.update(wp, gp, mp, vp, i);
    const float c = x < lo ? lo : (x > hi ? hi : x);
    wp[i] = c;
    return c;
  };
  with_binarizer(first, second, [&](const auto& binarize) { write_binarized(w, out, tap_major, updated, binarize); });
  return out;
}

// One AdamW step (AdamWArithmetic) of each weight i whose tensors the kernel takes: weights[i],
// grads[i], exp_avgs[i] and exp_avg_sqs[i] contiguous float32 CPU tensors of one shape and a
// multiple of 16 values, steps[i] a one-value float32 CPU tensor, which is incremented first,
// as torch's optimizer increments it before its kernel reads it. The values of all those
// weights are split between the threads in one parallel region: torch's kernel makes one per
// tensor, which on a network's many small tensors costs more than their arithmetic. Returns
// the indices of the weights it left alone (their steps untouched), for torch's kernel.
std::vector<int64_t> adamw_many(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& grads,
                                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                                const std::vector<at::Tensor>& steps, double lr, double beta1, double beta2,
                                double weight_decay, double eps) {
  const size_t count = weights.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  steps.size() == count,
              "adamw_many takes five lists of one length");
  check_beta1(beta1);
  struct Task {
    float* w;
    const float* g;
    float* m;
    float* v;
    int64_t start, end;  // the task's values in the concatenation of all tasks
    AdamWArithmetic adamw;
  };
  const auto dense = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
           t.sizes() == like.sizes();
  };
  std::vector<Task> tasks;
  std::vector<int64_t> declined;
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& step = steps[i];
    const bool takes = dense(w, w) && w.numel() % 16 == 0 && dense(grads[i], w) &&
                       dense(exp_avgs[i], w) && dense(exp_avg_sqs[i], w) && step.defined() &&
                       step.device().is_cpu() && step.scalar_type() == at::kFloat && step.numel() == 1;
    if (!takes) {
      declined.push_back(static_cast<int64_t>(i));
      continue;
    }
    float* step_value = step.data_ptr<float>();
    *step_value += 1.0f;
    tasks.push_back(Task{w.data_ptr<float>(), grads[i].data_ptr<float>(), exp_avgs[i].data_ptr<float>(),
                         exp_avg_sqs[i].data_ptr<float>(), total, total + w.numel(),
                         AdamWArithmetic(*step_value, lr, beta1, beta2, weight_decay, eps)});
    total += w.numel();
  }
  // Each value's update depends on nothing else: any split gives the same bits.
  at::parallel_for(0, total, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    auto task = std::upper_bound(tasks.begin(), tasks.end(), begin,
                                 [](int64_t value, const Task& t) { return value < t.end; });
    for (; task != tasks.end() && task->start < end; ++task) {
      const Task t = *task;
      const int64_t from = std::max(begin, t.start) - t.start, to = std::min(end, t.end) - t.start;
#pragma omp simd
      for (int64_t i = from; i < to; ++i) t.w[i] = t.adamw.update(t.w, t.g, t.m, t.v, i);
    }
  });
  return declined;
}

// t as int8 when every value is exactly -1, 0 or +1 (-0.0 counts as 0; NaN and the
// rest do not), else an empty tensor: the operands of the tap products' integer path
// (models/tap_conv.py), whose int32 sums of such products equal the float32 ones. One
// pass that converts and checks; a block that holds another value stops the work.
at::Tensor to_ternary_int8(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "to_ternary_int8 takes a contiguous float32 CPU tensor");
  auto out = at::empty(t.sizes(), t.options().dtype(at::kChar));
  const float* src = t.data_ptr<float>();
  int8_t* dst = out.data_ptr<int8_t>();
  std::atomic<bool> ternary{true};
  constexpr int64_t kCheckBlock = 4096;
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end && ternary.load(std::memory_order_relaxed); b += kCheckBlock) {
      const int64_t e = std::min(end, b + kCheckBlock);
      // The pointers as locals, which no store can alias, and an integer reduction: so GCC
      // vectorizes the loop (0.13 to 0.16 ms for a 9.4 MB weight on the AVX-512 machine, 0.23 ms built
      // for AVX2; with the captured pointers it did not, and took 1.6 to 2.1 ms).
      const float* in = src;
      int8_t* to = dst;
      int differ = 0;
#pragma omp simd reduction(| : differ)
      for (int64_t j = b; j < e; ++j) {
        const float v = in[j];
        const int q = (v > 0.0f) - (v < 0.0f);
        to[j] = static_cast<int8_t>(q);
        differ |= static_cast<float>(q) != v;  // NaN compares unequal
      }
      if (differ) ternary.store(false, std::memory_order_relaxed);
    }
  });
  return ternary.load() ? out : at::empty({0}, out.options());
}

// A weight gradient that the tap products wrote in their layout, Cout x T x Cin (T = k*k
// taps), as a new contiguous Cout x Cin x T tensor: the layout of the Cout x Cin x k x k
// weight. The same values as t.transpose(1, 2).contiguous(): here one output channel's
// T x Cin values at a time (36 KiB for 1024 channels, in the L1/L2 cache while it is
// read), 3x3 taps of 16 channels per register transpose, and the result written in whole
// streamed cache lines. On the Intel development machine PyTorch's strided copy of
// BNext-T's widest layer (36 MB) took 4.3 ms, this 1.7 ms, as long as a plain clone.
at::Tensor from_tap_major(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.is_contiguous(),
              "from_tap_major takes a contiguous float32 CPU tensor of Cout x taps x Cin values");
  const int64_t taps = t.size(1), cin = t.size(2), per_out = taps * cin;
  auto out = at::empty({t.size(0), cin, taps}, t.options());
  const float* src = t.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, t.size(0), std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, per_out)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t o = begin; o < end; ++o) {
                       const float* from = src + o * per_out;
                       float* to = dst + o * per_out;
                       int64_t first = 0;  // the channels below it are written
#if defined(__AVX512F__)
                       if (taps == 9) {
                         for (; first + 16 <= cin; first += 16) transpose_9_by_16(from + first, cin, to + first * taps);
                       }
#endif
                       for (int64_t c = first; c < cin; ++c) {
                         for (int64_t k = 0; k < taps; ++k) to[c * taps + k] = from[k * cin + c];
                       }
                     }
#if defined(__AVX512F__)
                     _mm_sfence();  // the streamed lines are visible to the other threads once parallel_for returns
#endif
                   });
  return out;
}

// The layouts of the tap products' rows (models/tap_conv.py): a contiguous N x C x H x W
// activation as a new contiguous (H*W) x N x C tensor (to_rows), and back (from_rows).
// On the Intel development machine PyTorch's strided copies took 4 to 7 times as long as
// a plain copy on BNext-T's 4x4 and 2x2 planes, these 1.2 to 2.7 times.
//
// Copies between planes (N x C x HW) and rows (HW x N x C), either way (ToRows: from the
// planes). Each thread takes a range of samples; for each sample the C x HW block (32 KiB
// for 512 channels of 4x4) stays in the L1/L2 cache while one position's values are read
// or written at a time, with the plane size a compile-time constant for the late stages'
// planes (1, 4 and 16 values); on 4x4 planes, 16 channels by 16 positions per register
// transpose.
template <bool ToRows>
void copy_rows(const float* src, float* dst, int64_t N, int64_t C, int64_t HW) {
  with_plane_size(HW, [&](auto hw) {
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, C * HW)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t plane = n * C * hw;
        int64_t first = 0;  // the channels below it are copied
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<decltype(hw), int64_t>) {
          if (hw == 16) {
            for (; first + 16 <= C; first += 16) {
              __m512 r[16];
              for (int64_t i = 0; i < 16; ++i) {  // channel first + i's plane, or position i's row
                r[i] = _mm512_loadu_ps(src + (ToRows ? plane + (first + i) * 16 : (i * N + n) * C + first));
              }
              transpose_16x16(r);
              for (int64_t i = 0; i < 16; ++i) {
                _mm512_storeu_ps(dst + (ToRows ? (i * N + n) * C + first : plane + (first + i) * 16), r[i]);
              }
            }
          }
        }
#endif
        for (int64_t p = 0; p < hw; ++p) {
          const int64_t row = (p * N + n) * C;
          if constexpr (ToRows) {
            float* to = dst + row;
            const float* from = src + plane;
#pragma omp simd
            for (int64_t c = first; c < C; ++c) to[c] = from[c * hw + p];
          } else {
            float* to = dst + plane;
            const float* from = src + row;
#pragma omp simd
            for (int64_t c = first; c < C; ++c) to[c * hw + p] = from[c];
          }
        }
      }
    });
  });
}

at::Tensor to_rows(const at::Tensor& x) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto out = at::empty({HW, N, C}, x.options());
  copy_rows<true>(x.data_ptr<float>(), out.data_ptr<float>(), N, C, HW);
  return out;
}

at::Tensor from_rows(const at::Tensor& rows, int64_t height, int64_t width) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 3 && rows.is_contiguous(),
              "from_rows takes a contiguous float32 CPU tensor of (H*W) x N x C values");
  TORCH_CHECK(height * width == rows.size(0), "from_rows: ", rows.size(0), " positions are not ", height, " x ", width);
  const int64_t N = rows.size(1), C = rows.size(2);
  auto out = at::empty({N, C, height, width}, rows.options());
  copy_rows<false>(rows.data_ptr<float>(), out.data_ptr<float>(), N, C, height * width);
  return out;
}

// Sets g_sample_split_values (for tests and benchmarks: either split gives the same bits)
// and returns the previous value.
int64_t set_sample_split_values(int64_t values) {
  TORCH_CHECK(values >= 0, "the sample-split limit must be >= 0 values, got ", values);
  const int64_t previous = g_sample_split_values;
  g_sample_split_values = values;
  return previous;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_prelu_forward", &bn_prelu_forward, "batch norm (training) + PReLU + spatial mean, forward");
  m.def("bn_prelu_backward", &bn_prelu_backward, "batch norm (training) + PReLU + spatial mean, backward");
  m.def("bn_prelu_statistics", &bn_prelu_statistics,
        "bn_prelu_forward's statistics, means and affine coefficients, without storing its output");
  m.def("gated_bn_forward", &gated_bn_forward, "batch_norm(gate * b [* r]) + r, forward", py::arg("b"),
        py::arg("gate"), py::arg("r"), py::arg("multiply_residual"), py::arg("gamma"), py::arg("beta"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"),
        py::arg("b_affine") = py::none());
  m.def("gated_bn_backward", &gated_bn_backward, "batch_norm(gate * b [* r]) + r, backward", py::arg("grad_y"),
        py::arg("b"), py::arg("gate"), py::arg("r"), py::arg("multiply_residual"), py::arg("gamma"),
        py::arg("save_mean"), py::arg("save_invstd"), py::arg("b_affine") = py::none());
  m.def("biased_sign_forward", &biased_sign_forward, "sign(x + bias), the spatial mean of x and prelu(x)");
  m.def("biased_sign_backward", &biased_sign_backward, "gradients of biased_sign_forward", py::arg("grad_y"),
        py::arg("grad_mean"), py::arg("grad_activated"), py::arg("x"), py::arg("bias"), py::arg("slope"),
        py::arg("clip"), py::arg("grad_shortcut") = py::none());
  m.def("recoupling_gate_forward", &recoupling_gate_forward, "the info-recoupling gate from the spatial means");
  m.def("recoupling_gate_backward", &recoupling_gate_backward, "gradients of recoupling_gate_forward");
  m.def("pool_2x2_forward", &pool_2x2_forward, "avg_pool2d(x, 2, 2), forward");
  m.def("pool_2x2_backward", &pool_2x2_backward, "avg_pool2d(x, 2, 2), backward");
  m.def("divide_clamp", &divide_clamp, "clamp(w / first / second, -1, 1), optionally in the tap-major layout");
  m.def("clamp_and_divide_clamp", &clamp_and_divide_clamp,
        "w.clamp_(-clip, clip) (writing only values out of range), then divide_clamp of the result");
  m.def("adamw_clamp_and_divide_clamp", &adamw_clamp_and_divide_clamp,
        "one AdamW step of w (torch's fused CPU arithmetic), then clamp_and_divide_clamp of the result");
  m.def("adamw_many", &adamw_many,
        "one AdamW step (torch's fused CPU arithmetic) of each weight whose tensors it takes, in one parallel "
        "region; returns the indices of the others");
  m.def("set_sample_split_values", &set_sample_split_values,
        "the largest activation (in values) that the two-pass kernels split by samples; returns the previous one");
  m.def("from_tap_major", &from_tap_major,
        "a Cout x taps x Cin tensor (the tap products' weight gradient) as a contiguous Cout x Cin x taps one");
  m.def("to_rows", &to_rows, "an N x C x H x W activation as a contiguous (H*W) x N x C tensor");
  m.def("from_rows", &from_rows, "a (H*W) x N x C tensor as a contiguous N x C x H x W activation",
        py::arg("rows"), py::arg("height"), py::arg("width"));
  m.def("to_ternary_int8", &to_ternary_int8, "t as int8 if all its values are -1, 0 or +1, else an empty tensor");
}
