// Fused training kernels of the BNext processor (CPU, float32, contiguous NCHW).
//
// In a binary network the convolutions are the real work; around each one the
// processor runs a chain of per-element operations (bias + sign, batch norm, PReLU,
// the spatial mean for the recoupling gate, gate * b [* residual], a second batch
// norm, + residual). Run one PyTorch kernel at a time, each of them reads and writes
// the whole activation, forward and backward. These kernels run each chain in two
// or three passes over the data: sums are accumulated in float over short blocks
// (vectorized) and in double beyond, and the values that the backward needs are
// recomputed from the saved inputs instead of being stored.
//
// Work is split over the channels (at::parallel_for): each thread walks its range of
// channels sample by sample, over the (sample, channel) planes of H*W contiguous
// values, and adds a channel's per-plane sums in sample order, so the results do not
// depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), name, " must be a contiguous N x C x H x W tensor");
}

void check_vector(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == C, name,
              " must be a contiguous float32 CPU tensor of ", C, " values");
}

// Per-plane sums add float sums of kBlock consecutive values (vectorized, a few
// additions per lane) in double, which keeps them as accurate as PyTorch's
// double-accumulating batch-norm statistics.
constexpr int64_t kBlock = 128;

// Per-channel sums. Each channel belongs to one thread (see for_each_plane), which adds
// the channel's per-plane sums in sample order: the results do not depend on the
// number of threads.
struct ChannelSums {
  ChannelSums(int64_t channels, int64_t count) : count(count), values(channels * count, 0.0) {}
  void add(int64_t c, int64_t which, double value) { values[c * count + which] += value; }
  double get(int64_t c, int64_t which) const { return values[c * count + which]; }
  int64_t count;
  std::vector<double> values;
};

// Runs fn(c, p, hw) for every (sample, channel) plane p = n * C + c of hw = H*W values.
// Threads take contiguous ranges of channels, about 64k values each at least (small
// layers stay on the calling thread), and walk them sample by sample, so each thread
// reads contiguous runs of memory and a channel's planes are visited in sample order.
// The late stages' planes are 1x1, 2x2 and 4x4: for these hw is a compile-time
// constant, so the per-plane loops unroll instead of costing more than their values.
template <typename Fn>
void for_each_plane(int64_t N, int64_t C, int64_t HW, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, N * HW));
  const auto run = [&](auto hw) {
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) fn(c, n * C + c, hw);
      }
    });
  };
  switch (HW) {
    case 1: run(std::integral_constant<int64_t, 1>{}); break;
    case 4: run(std::integral_constant<int64_t, 4>{}); break;
    case 16: run(std::integral_constant<int64_t, 16>{}); break;
    default: run(HW);
  }
}

// The batch statistics (from per-channel sums of x - shift and of its squares) as the affine map
// y = x * alpha + shift of PyTorch's batch-norm kernel, and the running-statistics
// update of torch.nn.functional.batch_norm in training mode (biased variance to
// normalize, unbiased to track).
struct Affine {
  at::Tensor mean, invstd;
  std::vector<float> alpha, shift;
};

Affine batch_stats(const ChannelSums& sums, const std::vector<float>& shift, int64_t C, int64_t M,
                   double eps, double momentum, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& running_mean,
                   const at::Tensor& running_var) {
  Affine out{at::empty({C}, gamma.options()), at::empty({C}, gamma.options()), std::vector<float>(C),
             std::vector<float>(C)};
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
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
  return out;
}

}  // namespace

// y = prelu(batch_norm(x)) with batch statistics (slope empty: no PReLU), and, when
// want_pooled, the spatial mean of y per (sample, channel). Returns
// {y, mean[C], invstd[C], pooled[N, C] (or empty)}; running statistics are updated in place.
std::vector<at::Tensor> bn_prelu_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& running_mean, const at::Tensor& running_var,
                                         double momentum, double eps, const at::Tensor& slope, bool want_pooled) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  TORCH_CHECK(M > 1, "batch norm in training needs more than one value per channel");
  check_vector(gamma, C, "gamma");
  check_vector(beta, C, "beta");
  check_vector(running_mean, C, "running_mean");
  check_vector(running_var, C, "running_var");
  const bool act = slope.numel() > 0;
  if (act) check_vector(slope, C, "slope");
  auto y = at::empty_like(x);
  auto pooled = want_pooled ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* pp = want_pooled ? pooled.data_ptr<float>() : nullptr;
  // Sums of x - k with k = x[0, c, 0, 0]: a shift near the data keeps the variance
  // (mean of squares minus squared mean) from cancelling when |mean| >> std.
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = xp[c * HW];
  ChannelSums sums(C, 2);
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float* src = xp + p * HW;
    const float k = shift[c];
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_block = 0.0f, sum_sq_block = 0.0f;
#pragma omp simd reduction(+ : sum_block, sum_sq_block)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = src[i] - k;
        sum_block += v;
        sum_sq_block += v * v;
      }
      sum += sum_block; sum_sq += sum_sq_block;
    }
    sums.add(c, 0, sum);
    sums.add(c, 1, sum_sq);
  });
  Affine affine = batch_stats(sums, shift, C, M, eps, momentum, gamma, beta, running_mean, running_var);
  const float* w = act ? slope.data_ptr<float>() : nullptr;
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float alpha = affine.alpha[c], shift = affine.shift[c], slope_c = act ? w[c] : 1.0f;
    const float* src = xp + p * HW;
    float* dst = yp + p * HW;
    double plane_sum = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float plane_sum_block = 0.0f;
#pragma omp simd reduction(+ : plane_sum_block)
      for (int64_t i = i0; i < i1; ++i) {
        const float z = src[i] * alpha + shift;
        const float out = (act && !(z > 0.0f)) ? slope_c * z : z;
        dst[i] = out;
        plane_sum_block += out;
      }
      plane_sum += plane_sum_block;
    }
    if (want_pooled) pp[p] = static_cast<float>(plane_sum / HW);
  });
  return {y, affine.mean, affine.invstd, pooled};
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
  const float* gpool = has_pooled ? grad_pooled.data_ptr<float>() : nullptr;
  const float* mean = save_mean.data_ptr<float>();
  const float* invstd = save_invstd.data_ptr<float>();
  const float* w = act ? slope.data_ptr<float>() : nullptr;
  std::vector<float> alpha(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = invstd[c] * gamma.data_ptr<float>()[c];
    shift[c] = beta.data_ptr<float>()[c] - mean[c] * alpha[c];
  }
  // Pass 1: the gradient reaching the batch-norm output (through PReLU), its sum and
  // its dot product with the centred input; the PReLU slope's gradient.
  ChannelSums sums(C, 3);
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float a = alpha[c], b = shift[c], m = mean[c], slope_c = act ? w[c] : 1.0f;
    const float extra = has_pooled ? gpool[p] / static_cast<float>(HW) : 0.0f;
    const float* src = xp + p * HW;
    const float* gy = gp + p * HW;
    double sum_dz = 0.0, dot = 0.0, dw = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_dz_block = 0.0f, dot_block = 0.0f, dw_block = 0.0f;
#pragma omp simd reduction(+ : sum_dz_block, dot_block, dw_block)
      for (int64_t i = i0; i < i1; ++i) {
        const float z = src[i] * a + b;
        const float dy = gy[i] + extra;
        const bool negative = act && !(z > 0.0f);
        const float dz = negative ? slope_c * dy : dy;
        sum_dz_block += dz;
        dot_block += dz * (src[i] - m);
        dw_block += negative ? dy * z : 0.0f;
      }
      sum_dz += sum_dz_block; dot += dot_block; dw += dw_block;
    }
    sums.add(c, 0, sum_dz);
    sums.add(c, 1, dot);
    sums.add(c, 2, dw);
  });
  std::vector<float> mean_dz(C), k(C);
  for (int64_t c = 0; c < C; ++c) {
    const double sum_dz = sums.get(c, 0), dot = sums.get(c, 1);
    grad_beta.data_ptr<float>()[c] = static_cast<float>(sum_dz);
    grad_gamma.data_ptr<float>()[c] = static_cast<float>(dot * invstd[c]);
    if (act) grad_slope.data_ptr<float>()[c] = static_cast<float>(sums.get(c, 2));
    mean_dz[c] = static_cast<float>(sum_dz / M);
    k[c] = static_cast<float>(dot / M * invstd[c] * invstd[c]);
  }
  // Pass 2: dx = gamma * invstd * (dz - mean(dz) - (x - mean) * mean(dz * (x - mean)) * invstd^2).
  float* gxp = grad_x.data_ptr<float>();
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float a = alpha[c], b = shift[c], m = mean[c], slope_c = act ? w[c] : 1.0f, md = mean_dz[c], kc = k[c];
    const float extra = has_pooled ? gpool[p] / static_cast<float>(HW) : 0.0f;
    const float* src = xp + p * HW;
    const float* gy = gp + p * HW;
    float* dst = gxp + p * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const float z = src[i] * a + b;
      const float dy = gy[i] + extra;
      const float dz = (act && !(z > 0.0f)) ? slope_c * dy : dy;
      dst[i] = (dz - md - (src[i] - m) * kc) * a;
    }
  });
  return {grad_x, grad_gamma, grad_beta, grad_slope};
}

// y = batch_norm(v) + r with v = (gate * b) [* r] and gate per (sample, channel).
// Returns {y, mean[C], invstd[C]}; running statistics are updated in place.
std::vector<at::Tensor> gated_bn_forward(const at::Tensor& b, const at::Tensor& gate, const at::Tensor& r,
                                         bool multiply_residual, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& running_mean, const at::Tensor& running_var,
                                         double momentum, double eps) {
  check_activation(b, "b");
  check_activation(r, "residual");
  TORCH_CHECK(r.sizes() == b.sizes(), "the residual must have the shape of b");
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3), M = N * HW;
  TORCH_CHECK(M > 1, "batch norm in training needs more than one value per channel");
  TORCH_CHECK(gate.is_contiguous() && gate.scalar_type() == at::kFloat && gate.numel() == N * C, "gate must be N x C");
  check_vector(gamma, C, "gamma");
  check_vector(beta, C, "beta");
  check_vector(running_mean, C, "running_mean");
  check_vector(running_var, C, "running_var");
  auto y = at::empty_like(b);
  const float* bp = b.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* gtp = gate.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> shift(C);  // as in bn_prelu_forward: sums of v - v[0, c, 0, 0]
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = multiply_residual ? (gtp[c] * bp[c * HW]) * rp[c * HW] : gtp[c] * bp[c * HW];
  }
  ChannelSums sums(C, 2);
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float* bs = bp + p * HW;
    const float* rs = rp + p * HW;
    const float s = gtp[p];
    const float k = shift[c];
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_block = 0.0f, sum_sq_block = 0.0f;
#pragma omp simd reduction(+ : sum_block, sum_sq_block)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = (multiply_residual ? (s * bs[i]) * rs[i] : s * bs[i]) - k;
        sum_block += v;
        sum_sq_block += v * v;
      }
      sum += sum_block; sum_sq += sum_sq_block;
    }
    sums.add(c, 0, sum);
    sums.add(c, 1, sum_sq);
  });
  Affine affine = batch_stats(sums, shift, C, M, eps, momentum, gamma, beta, running_mean, running_var);
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float alpha = affine.alpha[c], shift = affine.shift[c], s = gtp[p];
    const float* bs = bp + p * HW;
    const float* rs = rp + p * HW;
    float* dst = yp + p * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const float v = multiply_residual ? (s * bs[i]) * rs[i] : s * bs[i];
      dst[i] = (v * alpha + shift) + rs[i];
    }
  });
  return {y, affine.mean, affine.invstd};
}

// Gradients of gated_bn_forward: {grad_b, grad_gate[N, C], grad_r, grad_gamma, grad_beta}.
// Without multiply_residual, grad_r is grad_y itself and is returned empty (the caller passes grad_y on).
std::vector<at::Tensor> gated_bn_backward(const at::Tensor& grad_y, const at::Tensor& b, const at::Tensor& gate,
                                          const at::Tensor& r, bool multiply_residual, const at::Tensor& gamma,
                                          const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  check_activation(b, "b");
  check_activation(grad_y, "grad_y");
  check_activation(r, "residual");
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3), M = N * HW;
  auto grad_b = at::empty_like(b);
  auto grad_r = multiply_residual ? at::empty_like(r) : at::empty({0}, b.options());
  auto grad_gate = at::empty({N, C}, b.options());
  auto grad_gamma = at::empty({C}, b.options());
  auto grad_beta = at::empty({C}, b.options());
  const float* bp = b.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* gtp = gate.data_ptr<float>();
  const float* mean = save_mean.data_ptr<float>();
  const float* invstd = save_invstd.data_ptr<float>();
  ChannelSums sums(C, 2);
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float m = mean[c], s = gtp[p];
    const float* bs = bp + p * HW;
    const float* rs = rp + p * HW;
    const float* gy = gp + p * HW;
    double sum_dy = 0.0, dot = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_dy_block = 0.0f, dot_block = 0.0f;
#pragma omp simd reduction(+ : sum_dy_block, dot_block)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = multiply_residual ? (s * bs[i]) * rs[i] : s * bs[i];
        sum_dy_block += gy[i];
        dot_block += gy[i] * (v - m);
      }
      sum_dy += sum_dy_block; dot += dot_block;
    }
    sums.add(c, 0, sum_dy);
    sums.add(c, 1, dot);
  });
  std::vector<float> alpha(C), mean_dy(C), k(C);
  for (int64_t c = 0; c < C; ++c) {
    const double sum_dy = sums.get(c, 0), dot = sums.get(c, 1);
    grad_beta.data_ptr<float>()[c] = static_cast<float>(sum_dy);
    grad_gamma.data_ptr<float>()[c] = static_cast<float>(dot * invstd[c]);
    alpha[c] = invstd[c] * gamma.data_ptr<float>()[c];
    mean_dy[c] = static_cast<float>(sum_dy / M);
    k[c] = static_cast<float>(dot / M * invstd[c] * invstd[c]);
  }
  float* gbp = grad_b.data_ptr<float>();
  float* grp = multiply_residual ? grad_r.data_ptr<float>() : nullptr;
  float* ggp = grad_gate.data_ptr<float>();
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float a = alpha[c], m = mean[c], md = mean_dy[c], kc = k[c], s = gtp[p];
    const float* bs = bp + p * HW;
    const float* rs = rp + p * HW;
    const float* gy = gp + p * HW;
    float* gb = gbp + p * HW;
    float* gr = multiply_residual ? grp + p * HW : nullptr;
    double dgate = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float dgate_block = 0.0f;
      if (multiply_residual) {
#pragma omp simd reduction(+ : dgate_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float sb = s * bs[i];
          const float dv = (gy[i] - md - (sb * rs[i] - m) * kc) * a;
          const float dsb = dv * rs[i];  // gradient reaching s * b
          gb[i] = dsb * s;
          gr[i] = gy[i] + dv * sb;
          dgate_block += dsb * bs[i];
        }
      } else {
#pragma omp simd reduction(+ : dgate_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float dv = (gy[i] - md - (s * bs[i] - m) * kc) * a;
          gb[i] = dv * s;
          dgate_block += dv * bs[i];
        }
      }
      dgate += dgate_block;
    }
    ggp[p] = static_cast<float>(dgate);
  });
  return {grad_b, grad_gate, grad_r, grad_gamma, grad_beta};
}

// What a processor reads from its input x, in one pass: sign(x + bias) per channel
// (sign(0) = 0 as torch.sign); when want_mean, the spatial mean of x per (sample,
// channel); when slope is given, prelu(x, slope) (ELM attention's real shortcut).
// Returns {signs, mean[N, C] (or empty), prelu(x) (or empty)}.
std::vector<at::Tensor> biased_sign_forward(const at::Tensor& x, const at::Tensor& bias, bool want_mean,
                                            const at::Tensor& slope) {
  check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  check_vector(bias, C, "bias");
  const bool act = slope.numel() > 0;
  if (act) check_vector(slope, C, "slope");
  auto y = at::empty_like(x);
  auto mean = want_mean ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  auto activated = act ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* wp = act ? slope.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* mp = want_mean ? mean.data_ptr<float>() : nullptr;
  float* ap = act ? activated.data_ptr<float>() : nullptr;
  for_each_plane(N, C, HW, [&](int64_t c, int64_t p, auto HW) {
    const float beta = bp[c];
    const float w = act ? wp[c] : 1.0f;
    const float* src = xp + p * HW;
    float* dst = yp + p * HW;
    float* out = act ? ap + p * HW : nullptr;
    double sum = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_block = 0.0f;
      if (act) {
#pragma omp simd reduction(+ : sum_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float v = src[i] + beta;
          dst[i] = static_cast<float>((0.0f < v) - (v < 0.0f));
          out[i] = src[i] > 0.0f ? src[i] : w * src[i];
          sum_block += src[i];
        }
      } else {
#pragma omp simd reduction(+ : sum_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float v = src[i] + beta;
          dst[i] = static_cast<float>((0.0f < v) - (v < 0.0f));
          sum_block += src[i];
        }
      }
      sum += sum_block;
    }
    if (want_mean) mp[p] = static_cast<float>(sum / HW);
  });
  return {y, mean, activated};
}

// Gradients of biased_sign_forward. The sign's straight-through gradient passes where
// -clip <= x + bias <= clip (as hardtanh_backward with bounds just outside +-clip);
// grad_mean / (H*W) and the PReLU's gradient are added when given (empty otherwise).
// Returns {grad_x, grad_bias, grad_slope (or empty)}.
std::vector<at::Tensor> biased_sign_backward(const at::Tensor& grad_y, const at::Tensor& grad_mean,
                                             const at::Tensor& grad_activated, const at::Tensor& x,
                                             const at::Tensor& bias, const at::Tensor& slope, double clip) {
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
  auto grad_x = at::empty_like(x);
  auto grad_bias = at::empty({C}, x.options());
  auto grad_slope = act ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* gap = act ? grad_activated.data_ptr<float>() : nullptr;
  const float* gmp = has_mean ? grad_mean.data_ptr<float>() : nullptr;
  const float* bp = bias.data_ptr<float>();
  const float* wp = act ? slope.data_ptr<float>() : nullptr;
  float* gxp = grad_x.data_ptr<float>();
  const float lo = static_cast<float>(-clip), hi = static_cast<float>(clip);
  ChannelSums sums(C, 2);
  for_each_plane(N, C, HW, [&, lo, hi](int64_t c, int64_t p, auto HW) {  // bounds by value: no aliasing with the stores
    const float beta = bp[c];
    const float w = act ? wp[c] : 1.0f;
    const float extra = has_mean ? gmp[p] / static_cast<float>(HW) : 0.0f;
    const float* src = xp + p * HW;
    const float* gy = gp + p * HW;
    const float* ga = act ? gap + p * HW : nullptr;
    float* dst = gxp + p * HW;
    double sum = 0.0, dw = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
      const int64_t i1 = std::min<int64_t>(HW, i0 + kBlock);
      float sum_block = 0.0f, dw_block = 0.0f;
      if (act) {
#pragma omp simd reduction(+ : sum_block, dw_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float v = src[i] + beta;
          const float g = (v < lo || v > hi) ? 0.0f : gy[i];
          const bool positive = src[i] > 0.0f;
          dst[i] = (g + extra) + (positive ? ga[i] : w * ga[i]);
          sum_block += g;
          dw_block += positive ? 0.0f : ga[i] * src[i];
        }
      } else {
#pragma omp simd reduction(+ : sum_block)
        for (int64_t i = i0; i < i1; ++i) {
          const float v = src[i] + beta;
          const float g = (v < lo || v > hi) ? 0.0f : gy[i];
          dst[i] = g + extra;
          sum_block += g;
        }
      }
      sum += sum_block;
      dw += dw_block;
    }
    sums.add(c, 0, sum);
    sums.add(c, 1, dw);
  });
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
  for_each_plane(N, C, H * W, [&](int64_t, int64_t p, auto) {
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

// Gradient of pool_2x2_forward for an H x W input: grad / 4 on each value of its
// window; an odd last row or column gets zero, as with avg_pool2d's floor.
at::Tensor pool_2x2_backward(const at::Tensor& grad, int64_t H, int64_t W) {
  check_activation(grad, "grad");
  const int64_t N = grad.size(0), C = grad.size(1), Ho = grad.size(2), Wo = grad.size(3);
  TORCH_CHECK(H / 2 == Ho && W / 2 == Wo, "the gradient's size does not match an H x W input pooled by 2");
  auto grad_x = at::empty({N, C, H, W}, grad.options());
  const float* gp = grad.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  for_each_plane(N, C, H * W, [&](int64_t, int64_t p, auto) {
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

// clamp(w / first / second, -1, 1) in one pass: the progressive weight binarization of
// models/quantizers.py (three passes there), the same operations in the same order.
// NaN stays NaN, as with torch.clamp.
at::Tensor divide_clamp(const at::Tensor& w, double first, double second) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "the weight must be a contiguous float32 CPU tensor");
  auto out = at::empty_like(w);
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float d1 = static_cast<float>(first), d2 = static_cast<float>(second);
  at::parallel_for(0, w.numel(), 1 << 16, [&, d1, d2](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = (src[i] / d1) / d2;
      dst[i] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_prelu_forward", &bn_prelu_forward, "batch norm (training) + PReLU + spatial mean, forward");
  m.def("bn_prelu_backward", &bn_prelu_backward, "batch norm (training) + PReLU + spatial mean, backward");
  m.def("gated_bn_forward", &gated_bn_forward, "batch_norm(gate * b [* r]) + r, forward");
  m.def("gated_bn_backward", &gated_bn_backward, "batch_norm(gate * b [* r]) + r, backward");
  m.def("biased_sign_forward", &biased_sign_forward, "sign(x + bias), the spatial mean of x and prelu(x)");
  m.def("biased_sign_backward", &biased_sign_backward, "gradients of biased_sign_forward");
  m.def("pool_2x2_forward", &pool_2x2_forward, "avg_pool2d(x, 2, 2), forward");
  m.def("pool_2x2_backward", &pool_2x2_backward, "avg_pool2d(x, 2, 2), backward");
  m.def("divide_clamp", &divide_clamp, "clamp(w / first / second, -1, 1)");
}
