// XNOR/popcount convolution on bit-packed activations and weights (CPU).
//
// Bit convention (shared with models/bitpack.py): a value of -1 is stored as bit 1,
// a value of +1 as bit 0. Channel c lives in bit (c % 64) of word (c / 64); the
// unused high bits of the last word are 0 in activations and weights alike, so their
// XOR is 0 and they never reach a popcount. For two +-1 vectors of length C,
//     dot = C - 2 * popcount(a XOR w).
//
// Activations are packed into a spatially padded NHWC word buffer whose border
// words are 0 (= +1). The float model pads with zeros, not +1, so for border output
// positions the contribution of the padded taps, sum_c w[o, c, tap], is subtracted
// again (a per-(output channel, tap) table computed when the weights are prepared).
//
// Weights are interleaved in blocks of kOB output channels,
//     wt[ob][kh][kw * Cw + j][lane],   o = ob * kOB + lane,
// so that one activation word meets kOB weight words held contiguously: the inner
// lane loop becomes XOR + vector popcount + add (vpopcntq with AVX512-VPOPCNTDQ,
// otherwise the compiler's popcount sequence).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kOB = 16;  // output channels per block (two 512-bit vectors of 64-bit lanes)
constexpr int64_t kPB = 4;   // output positions per block (reuse of each weight vector)

// Packs sign(x - thr) of an NCHW float tensor into the padded NHWC word buffer,
// without transposing the tensor first. With AVX-512, 16 positions of one input row
// are handled at once: for each channel c, one compare of 16 consecutive floats
// gives a 16-bit mask, and a masked OR sets bit c in the words of the positions
// whose value is below the threshold (two registers of eight 64-bit words).
// Returns the number of elements with x == thr exactly (sign 0), which the caller
// corrects for: they are packed as +1.
int64_t pack_rows(const float* x, const float* thr, uint64_t* out, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t pad) {
  const int64_t Cw = (C + 63) / 64;
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  std::vector<int64_t> zeros(N * H, 0);
  // One task per input row (n, h): every task writes its own row of words, so no two
  // threads touch the same word. Small layers stay on the calling thread: waking the
  // pool costs more than they do (and much more on an oversubscribed machine).
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, C * W));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H;
      uint64_t* row = out + ((n * Hp + h + pad) * Wp + pad) * Cw;
      const float* src = x + (n * C * H + h) * W;  // channel c of this row: src + c * H * W
      const int64_t plane = H * W;
      int64_t zero_count = 0;
#if defined(__AVX512F__)
      const __m512i stride_index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
      const __m512i word_index = _mm512_mullo_epi64(stride_index, _mm512_set1_epi64(Cw));
      for (int64_t w0 = 0; w0 < W; w0 += 16) {
        const int64_t len = std::min<int64_t>(16, W - w0);
        const __mmask16 valid = static_cast<__mmask16>((len == 16) ? 0xFFFF : ((1u << len) - 1));
        for (int64_t j = 0; j < Cw; ++j) {
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          const int64_t c_end = std::min<int64_t>(C, (j + 1) * 64);
          for (int64_t c = j * 64; c < c_end; ++c) {
            const __m512 v = _mm512_maskz_loadu_ps(valid, src + c * plane + w0);
            const __m512 t = _mm512_set1_ps(thr[c]);
            const __mmask16 below = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_LT_OQ);
            zero_count += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, v, t, _CMP_EQ_OQ));
            const __m512i bit = _mm512_set1_epi64(static_cast<long long>(1ULL << (c & 63)));
            lo = _mm512_mask_or_epi64(lo, static_cast<__mmask8>(below), lo, bit);
            hi = _mm512_mask_or_epi64(hi, static_cast<__mmask8>(below >> 8), hi, bit);
          }
          uint64_t* dst = row + w0 * Cw + j;
          const __mmask8 lo_valid = static_cast<__mmask8>(valid), hi_valid = static_cast<__mmask8>(valid >> 8);
          if (Cw == 1) {
            _mm512_mask_storeu_epi64(dst, lo_valid, lo);
            _mm512_mask_storeu_epi64(dst + 8, hi_valid, hi);
          } else {
            _mm512_mask_i64scatter_epi64(dst, lo_valid, word_index, lo, 8);
            _mm512_mask_i64scatter_epi64(dst + 8 * Cw, hi_valid, word_index, hi, 8);
          }
        }
      }
#else
      for (int64_t c = 0; c < C; ++c) {
        const float t = thr[c];
        const uint64_t shift = static_cast<uint64_t>(c & 63);
        uint64_t* dst = row + (c >> 6);
        const float* values = src + c * plane;
        for (int64_t w = 0; w < W; ++w) {
          const float v = values[w];
          dst[w * Cw] |= static_cast<uint64_t>(v < t) << shift;
          zero_count += (v == t);
        }
      }
#endif
      zeros[r] = zero_count;
    }
  });
  int64_t total = 0;
  for (int64_t z : zeros) total += z;
  return total;
}

// acc[p][lane] = sum over the window of popcount(a XOR w) for kPB output positions
// and kOB output channels. The window of position p is K rows of ``len`` = K*Cw
// consecutive words starting at abase[p], rows ``row_stride`` words apart; the
// weights are K*len blocks of kOB words. The sums stay in registers for the whole
// window, so small channel counts (Cw = 1 or 2) do not pay a store per row.
inline void accumulate_window(const uint64_t* const* abase, int64_t row_stride, const uint64_t* wblock, int64_t K,
                              int64_t len, uint64_t (*acc)[kOB]) {
#if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512F__)
  static_assert(kOB == 16, "the AVX-512 path holds one weight block in two registers");
  __m512i s[kPB][2];
  for (int64_t p = 0; p < kPB; ++p) s[p][0] = s[p][1] = _mm512_setzero_si512();
  for (int64_t kh = 0; kh < K; ++kh) {
    const uint64_t* wrow = wblock + kh * len * kOB;
    const uint64_t* a0 = abase[0] + kh * row_stride;
    const uint64_t* a1 = abase[1] + kh * row_stride;
    const uint64_t* a2 = abase[2] + kh * row_stride;
    const uint64_t* a3 = abase[3] + kh * row_stride;
    static_assert(kPB == 4, "the AVX-512 path is unrolled for four positions");
    for (int64_t j = 0; j < len; ++j) {
      const __m512i w0 = _mm512_loadu_si512(wrow + j * kOB);
      const __m512i w1 = _mm512_loadu_si512(wrow + j * kOB + 8);
      const __m512i b0 = _mm512_set1_epi64(static_cast<long long>(a0[j]));
      const __m512i b1 = _mm512_set1_epi64(static_cast<long long>(a1[j]));
      const __m512i b2 = _mm512_set1_epi64(static_cast<long long>(a2[j]));
      const __m512i b3 = _mm512_set1_epi64(static_cast<long long>(a3[j]));
      s[0][0] = _mm512_add_epi64(s[0][0], _mm512_popcnt_epi64(_mm512_xor_si512(b0, w0)));
      s[0][1] = _mm512_add_epi64(s[0][1], _mm512_popcnt_epi64(_mm512_xor_si512(b0, w1)));
      s[1][0] = _mm512_add_epi64(s[1][0], _mm512_popcnt_epi64(_mm512_xor_si512(b1, w0)));
      s[1][1] = _mm512_add_epi64(s[1][1], _mm512_popcnt_epi64(_mm512_xor_si512(b1, w1)));
      s[2][0] = _mm512_add_epi64(s[2][0], _mm512_popcnt_epi64(_mm512_xor_si512(b2, w0)));
      s[2][1] = _mm512_add_epi64(s[2][1], _mm512_popcnt_epi64(_mm512_xor_si512(b2, w1)));
      s[3][0] = _mm512_add_epi64(s[3][0], _mm512_popcnt_epi64(_mm512_xor_si512(b3, w0)));
      s[3][1] = _mm512_add_epi64(s[3][1], _mm512_popcnt_epi64(_mm512_xor_si512(b3, w1)));
    }
  }
  for (int64_t p = 0; p < kPB; ++p) {
    _mm512_store_si512(acc[p], s[p][0]);
    _mm512_store_si512(acc[p] + 8, s[p][1]);
  }
#elif defined(__AVX2__)
  // No vector popcount: count bits per byte with the nibble lookup (vpshufb), add
  // byte counts for up to 31 words (31 * 8 < 256), then widen with vpsadbw.
  static_assert(kOB == 16, "the AVX2 path holds one weight block in four registers");
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i total[kPB][4];
  for (int64_t p = 0; p < kPB; ++p)
    for (int q = 0; q < 4; ++q) total[p][q] = _mm256_setzero_si256();
  for (int64_t kh = 0; kh < K; ++kh)
  for (int64_t j0 = 0; j0 < len; j0 += 31) {
    const uint64_t* wrow = wblock + kh * len * kOB;
    const int64_t j1 = std::min<int64_t>(len, j0 + 31);
    __m256i bytes[kPB][4];
    for (int64_t p = 0; p < kPB; ++p)
      for (int q = 0; q < 4; ++q) bytes[p][q] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      __m256i w[4];
      for (int q = 0; q < 4; ++q) w[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + j * kOB + 4 * q));
      for (int64_t p = 0; p < kPB; ++p) {
        const __m256i a = _mm256_set1_epi64x(static_cast<long long>(abase[p][kh * row_stride + j]));
        for (int q = 0; q < 4; ++q) {
          const __m256i v = _mm256_xor_si256(a, w[q]);
          const __m256i cnt = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                                              _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
          bytes[p][q] = _mm256_add_epi8(bytes[p][q], cnt);
        }
      }
    }
    for (int64_t p = 0; p < kPB; ++p)
      for (int q = 0; q < 4; ++q)
        total[p][q] = _mm256_add_epi64(total[p][q], _mm256_sad_epu8(bytes[p][q], _mm256_setzero_si256()));
  }
  for (int64_t p = 0; p < kPB; ++p) {
    alignas(32) uint64_t tmp[kOB];
    for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4 * q), total[p][q]);
    for (int64_t l = 0; l < kOB; ++l) acc[p][l] = tmp[l];
  }
#else
  for (int64_t p = 0; p < kPB; ++p)
    for (int64_t l = 0; l < kOB; ++l) acc[p][l] = 0;
  for (int64_t kh = 0; kh < K; ++kh) {
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t* wv = wblock + (kh * len + j) * kOB;
      for (int64_t p = 0; p < kPB; ++p) {
        const uint64_t av = abase[p][kh * row_stride + j];
        for (int64_t l = 0; l < kOB; ++l) acc[p][l] += static_cast<uint64_t>(__builtin_popcountll(av ^ wv[l]));
      }
    }
  }
#endif
}

}  // namespace

// x: float32 [N, C, H, W]; thr: float32 [C]. Returns (packed int64 [N, H+2p, W+2p, Cw], zero count).
std::tuple<torch::Tensor, int64_t> pack_activations(torch::Tensor x, torch::Tensor thr, int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "x must be a float32 NCHW tensor");
  TORCH_CHECK(thr.scalar_type() == torch::kFloat32 && thr.numel() == x.size(1), "one float32 threshold per channel");
  x = x.contiguous();
  thr = thr.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cw = (C + 63) / 64;
  auto out = torch::zeros({N, H + 2 * pad, W + 2 * pad, Cw}, x.options().dtype(torch::kInt64));
  const int64_t zeros = pack_rows(x.data_ptr<float>(), thr.data_ptr<float>(),
                                  reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()), N, C, H, W, pad);
  return {out, zeros};
}

// The per-output-channel step applied to the integers before they are stored:
// y -> prelu(fma(y, scale, shift), slope) when ``fused`` (a folded batch norm and the
// PReLU after it; fma and "v > 0 ? v : slope * v" are what PyTorch's batch-norm and
// PReLU CPU kernels compute, so the result has the same bits as those two modules),
// otherwise y unchanged.
struct Epilogue {
  bool fused = false;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* slope = nullptr;

  inline float apply(float y, int64_t o) const {
    if (!fused) return y;
    const float v = std::fma(y, scale[o], shift[o]);
    return v > 0.0f ? v : slope[o] * v;
  }
};

#if defined(__AVX512F__)
// Writes a block of kPB = 4 positions x kOB = 16 channels (acc, already complete and
// free of border corrections) to the NCHW output: the 4 x 16 block is transposed in
// registers so that each channel's 4 consecutive positions go out as one 16-byte store.
inline void store_block_avx512(const uint64_t (*acc)[kOB], int32_t full, const Epilogue& ep, int64_t o0, float* y,
                               int64_t plane) {
  static_assert(kPB == 4 && kOB == 16, "the store is written for 4 x 16 blocks");
  __m512 f[kPB];
  const __m512i full_v = _mm512_set1_epi64(full);
  for (int64_t p = 0; p < kPB; ++p) {
    // value = full - 2 * mismatches, exact in int64, then exactly representable in float32.
    const __m512i lo = _mm512_sub_epi64(full_v, _mm512_slli_epi64(_mm512_load_si512(acc[p]), 1));
    const __m512i hi = _mm512_sub_epi64(full_v, _mm512_slli_epi64(_mm512_load_si512(acc[p] + 8), 1));
    f[p] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)), _mm512_cvtepi64_ps(hi), 1);
    if (ep.fused) {
      const __m512 v = _mm512_fmadd_ps(f[p], _mm512_loadu_ps(ep.scale + o0), _mm512_loadu_ps(ep.shift + o0));
      const __mmask16 positive = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
      f[p] = _mm512_mask_blend_ps(positive, _mm512_mul_ps(_mm512_loadu_ps(ep.slope + o0), v), v);
    }
  }
  const __m512 t0 = _mm512_unpacklo_ps(f[0], f[1]), t1 = _mm512_unpackhi_ps(f[0], f[1]);
  const __m512 t2 = _mm512_unpacklo_ps(f[2], f[3]), t3 = _mm512_unpackhi_ps(f[2], f[3]);
  __m512 u[4];
  u[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  u[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  u[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  u[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // 128-bit lane k of u[r] holds channel 4k + r at the 4 positions.
  for (int r = 0; r < 4; ++r) {
    _mm_storeu_ps(y + (4 * 0 + r) * plane, _mm512_extractf32x4_ps(u[r], 0));
    _mm_storeu_ps(y + (4 * 1 + r) * plane, _mm512_extractf32x4_ps(u[r], 1));
    _mm_storeu_ps(y + (4 * 2 + r) * plane, _mm512_extractf32x4_ps(u[r], 2));
    _mm_storeu_ps(y + (4 * 3 + r) * plane, _mm512_extractf32x4_ps(u[r], 3));
  }
}
#endif

// packed: int64 [N, H+2p, W+2p, Cw] from pack_activations.
// wt: int64 [nOB, K, K*Cw, kOB] interleaved weights; tap_sums: int32 [O, K*K].
// scale, shift, slope: float32 [O] each for the fused epilogue, or all empty for none.
// Returns float32 [N, O, OH, OW]: the exact integer dot products of the float model's
// zero-padded convolution, passed through the epilogue.
torch::Tensor xnor_conv2d(torch::Tensor packed, torch::Tensor wt, torch::Tensor tap_sums, int64_t C, int64_t O,
                          int64_t K, int64_t stride, int64_t pad, int64_t H, int64_t W, torch::Tensor scale,
                          torch::Tensor shift, torch::Tensor slope) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt64, "packed activations must be int64 NHWC");
  TORCH_CHECK(wt.dim() == 4 && wt.scalar_type() == torch::kInt64 && wt.size(3) == kOB, "bad weight layout");
  const int64_t N = packed.size(0), Hp = packed.size(1), Wp = packed.size(2), Cw = packed.size(3);
  TORCH_CHECK(Hp == H + 2 * pad && Wp == W + 2 * pad && Cw == (C + 63) / 64, "packed shape does not fit");
  const int64_t KCw = K * Cw;
  TORCH_CHECK(wt.size(1) == K && wt.size(2) == KCw && wt.size(0) * kOB >= O, "weights do not fit the input");
  TORCH_CHECK(tap_sums.scalar_type() == torch::kInt32 && tap_sums.size(0) == O && tap_sums.size(1) == K * K,
              "tap_sums must be int32 [O, K*K]");
  Epilogue ep;
  if (scale.numel() > 0) {
    // Padded by the caller to a whole block of kOB channels, so that the vector store
    // may read the parameters of 16 lanes even in the last, partial block.
    const int64_t padded = ((O + kOB - 1) / kOB) * kOB;
    TORCH_CHECK(scale.numel() == padded && shift.numel() == padded && slope.numel() == padded &&
                    scale.is_contiguous() && shift.is_contiguous() && slope.is_contiguous() &&
                    scale.scalar_type() == torch::kFloat32 && shift.scalar_type() == torch::kFloat32 &&
                    slope.scalar_type() == torch::kFloat32,
                "epilogue scale, shift and slope must be contiguous float32 [O rounded up to 16]");
    ep.fused = true;
    ep.scale = scale.data_ptr<float>();
    ep.shift = shift.data_ptr<float>();
    ep.slope = slope.data_ptr<float>();
  }
  packed = packed.contiguous();
  wt = wt.contiguous();
  tap_sums = tap_sums.contiguous();
  const int64_t OH = (H + 2 * pad - K) / stride + 1, OW = (W + 2 * pad - K) / stride + 1;
  const int64_t nOB = wt.size(0);
  auto out = torch::empty({N, O, OH, OW}, packed.options().dtype(torch::kFloat32));
  const uint64_t* A = reinterpret_cast<const uint64_t*>(packed.data_ptr<int64_t>());
  const uint64_t* Wt = reinterpret_cast<const uint64_t*>(wt.data_ptr<int64_t>());
  const int32_t* S = tap_sums.data_ptr<int32_t>();
  float* Y = out.data_ptr<float>();
  const int32_t full = static_cast<int32_t>(K * K * C);
  const int64_t plane = OH * OW;

  // Tasks are (n, output row, output-channel block): enough of them to keep every
  // thread busy even at 7x7 resolution, and each task's weight block (K*K*Cw*kOB
  // words, at most 9*32*16*8 = 36 KiB) stays in L1/L2 while it sweeps the row.
  const int64_t tasks = N * OH * nOB;
  // At least ~32K word operations per chunk, so that small layers run on the calling thread.
  const int64_t task_words = std::max<int64_t>(1, OW * kOB * K * KCw);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / task_words);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ob = task % nOB;
      const int64_t row = task / nOB;
      const int64_t n = row / OH, oh = row % OH;
      const uint64_t* wblock = Wt + ob * K * KCw * kOB;
      const int64_t lanes = std::min<int64_t>(kOB, O - ob * kOB);
      // Rows of the window that fall inside the unpadded input.
      const int64_t ih0 = oh * stride - pad;
      const bool rows_inside = ih0 >= 0 && ih0 + K <= H;
      for (int64_t ow0 = 0; ow0 < OW; ow0 += kPB) {
        const int64_t np = std::min<int64_t>(kPB, OW - ow0);
        alignas(64) uint64_t acc[kPB][kOB];
        const uint64_t* abase[kPB];
        for (int64_t p = 0; p < kPB; ++p) {
          // Positions past the row end reuse the last valid one; their sums are discarded.
          const int64_t ow = ow0 + std::min<int64_t>(p, np - 1);
          abase[p] = A + ((n * Hp + oh * stride) * Wp + ow * stride) * Cw;
        }
        accumulate_window(abase, Wp * Cw, wblock, K, KCw, acc);
        float* y = Y + (n * O + ob * kOB) * plane + oh * OW + ow0;
#if defined(__AVX512F__)
        const bool block_inside = rows_inside && ow0 * stride - pad >= 0 && (ow0 + kPB - 1) * stride - pad + K <= W;
        if (np == kPB && lanes == kOB && block_inside) {
          store_block_avx512(acc, full, ep, ob * kOB, y, plane);
          continue;
        }
#endif
        for (int64_t p = 0; p < np; ++p) {
          const int64_t ow = ow0 + p;
          const int64_t iw0 = ow * stride - pad;
          const bool inside = rows_inside && iw0 >= 0 && iw0 + K <= W;
          for (int64_t l = 0; l < lanes; ++l) {
            const int64_t o = ob * kOB + l;
            int32_t value = full - 2 * static_cast<int32_t>(acc[p][l]);
            if (!inside) {
              // Padded taps were read as +1; the float model reads 0 there.
              for (int64_t kh = 0; kh < K; ++kh) {
                const bool row_ok = ih0 + kh >= 0 && ih0 + kh < H;
                for (int64_t kw = 0; kw < K; ++kw) {
                  const bool col_ok = iw0 + kw >= 0 && iw0 + kw < W;
                  if (!(row_ok && col_ok)) value -= S[o * K * K + kh * K + kw];
                }
              }
            }
            y[l * plane + p] = ep.apply(static_cast<float>(value), o);
          }
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------
// Fused real-valued tail of a BNext processor (info-recoupling and the module output),
// for NCHW float32 tensors. Each element goes through the same float operations as
// the PyTorch modules, one rounding per operation (no contraction: -ffp-contract=off),
// so only the order of the average-pooling sum differs from PyTorch.

// mean over H*W of  g*x_mix + (1-g)*b  per (n, c), with g per channel: the input of the
// squeeze-excitation gate, computed without storing the mixed tensor.
torch::Tensor mix_mean(torch::Tensor b, torch::Tensor x_mix, torch::Tensor gate) {
  TORCH_CHECK(b.dim() == 4 && b.sizes() == x_mix.sizes() && b.scalar_type() == torch::kFloat32 &&
                  x_mix.scalar_type() == torch::kFloat32 && gate.scalar_type() == torch::kFloat32 &&
                  gate.numel() == b.size(1),
              "mix_mean: b and x_mix must be float32 N x C x H x W of one shape, gate float32 [C]");
  b = b.contiguous();
  x_mix = x_mix.contiguous();
  gate = gate.contiguous();
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3);
  auto out = torch::empty({N, C}, b.options());
  const float* B = b.data_ptr<float>();
  const float* X = x_mix.data_ptr<float>();
  const float* G = gate.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, HW));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const float g = G[plane % C];
      const float h = 1.0f - g;
      const float* bp = B + plane * HW;
      const float* xp = X + plane * HW;
      // Eight float partial sums (vectorizable), combined in double.
      float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= HW; i += 8)
        for (int k = 0; k < 8; ++k) {
          const float first = g * xp[i + k];
          const float second = h * bp[i + k];
          partial[k] += first + second;
        }
      double total = 0.0;
      for (; i < HW; ++i) {
        const float first = g * xp[i];
        const float second = h * bp[i];
        total += static_cast<double>(first + second);
      }
      for (int k = 0; k < 8; ++k) total += partial[k];
      Y[plane] = static_cast<float>(total / static_cast<double>(HW));
    }
  });
  return out;
}

// out = fma(v, scale, shift) + r  with  v = (s * b) [* r when multiply_residual]:
// ELM attention's  norm2(se * b * r) + r  and the FFNs'  norm2(se * b) + shortcut,
// with s the gate per (n, c) and the folded norm2 per channel.
torch::Tensor gate_affine_residual(torch::Tensor b, torch::Tensor s, torch::Tensor r, torch::Tensor scale,
                                   torch::Tensor shift, bool multiply_residual) {
  TORCH_CHECK(b.dim() == 4 && b.sizes() == r.sizes() && b.scalar_type() == torch::kFloat32 &&
                  r.scalar_type() == torch::kFloat32 && s.scalar_type() == torch::kFloat32 &&
                  s.numel() == b.size(0) * b.size(1) && scale.numel() == b.size(1) && shift.numel() == b.size(1),
              "gate_affine_residual: shapes or dtypes do not fit");
  b = b.contiguous();
  r = r.contiguous();
  s = s.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = b.size(0), C = b.size(1), HW = b.size(2) * b.size(3);
  auto out = torch::empty_like(b);
  const float* B = b.data_ptr<float>();
  const float* R = r.data_ptr<float>();
  const float* S = s.data_ptr<float>();
  const float* A = scale.data_ptr<float>();
  const float* D = shift.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, HW));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const float gate = S[plane], a = A[c], d = D[c];
      const float* bp = B + plane * HW;
      const float* rp = R + plane * HW;
      float* yp = Y + plane * HW;
      if (multiply_residual) {
        for (int64_t i = 0; i < HW; ++i) {
          const float v = (gate * bp[i]) * rp[i];
          yp[i] = std::fma(v, a, d) + rp[i];
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) yp[i] = std::fma(gate * bp[i], a, d) + rp[i];
      }
    }
  });
  return out;
}

// The two shortcuts of a stride-2 ELM-attention module in one pass over x:
// avg_pool2x2(x) and avg_pool2x2(prelu(x, slope)), each window summed as
// ((x00 + x01) + x10) + x11 and scaled by 0.25 (exactly /4), as F.avg_pool2d does.
std::tuple<torch::Tensor, torch::Tensor> pool2x2_prelu(torch::Tensor x, torch::Tensor slope) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && slope.scalar_type() == torch::kFloat32 &&
                  slope.numel() == x.size(1) && x.size(2) >= 2 && x.size(3) >= 2,
              "pool2x2_prelu: x float32 N x C x H x W (H, W >= 2), slope float32 [C]");
  x = x.contiguous();
  slope = slope.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = H / 2, OW = W / 2;
  auto pooled = torch::empty({N, C, OH, OW}, x.options());
  auto pooled_prelu = torch::empty({N, C, OH, OW}, x.options());
  const float* X = x.data_ptr<float>();
  const float* A = slope.data_ptr<float>();
  float* P = pooled.data_ptr<float>();
  float* Q = pooled_prelu.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const float a = A[plane % C];
      const float* xp = X + plane * H * W;
      float* pp = P + plane * OH * OW;
      float* qp = Q + plane * OH * OW;
      for (int64_t i = 0; i < OH; ++i) {
        const float* top = xp + (2 * i) * W;
        const float* bottom = top + W;
        for (int64_t j = 0; j < OW; ++j) {
          const float v00 = top[2 * j], v01 = top[2 * j + 1], v10 = bottom[2 * j], v11 = bottom[2 * j + 1];
          pp[i * OW + j] = (((v00 + v01) + v10) + v11) * 0.25f;
          const float r00 = v00 > 0.0f ? v00 : a * v00, r01 = v01 > 0.0f ? v01 : a * v01;
          const float r10 = v10 > 0.0f ? v10 : a * v10, r11 = v11 > 0.0f ? v11 : a * v11;
          qp[i * OW + j] = (((r00 + r01) + r10) + r11) * 0.25f;
        }
      }
    }
  });
  return {pooled, pooled_prelu};
}

// Canonical packed weights int64 [O, K, K, Cw] -> interleaved [nOB, K, K*Cw, kOB] (zero-padded lanes).
torch::Tensor interleave_weights(torch::Tensor packed) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt64, "weights must be int64 [O, K, K, Cw]");
  const int64_t O = packed.size(0), K = packed.size(1), Cw = packed.size(3);
  const int64_t nOB = (O + kOB - 1) / kOB;
  auto padded = torch::zeros({nOB * kOB, K, K * Cw}, packed.options());
  padded.narrow(0, 0, O).copy_(packed.contiguous().view({O, K, K * Cw}));
  return padded.view({nOB, kOB, K, K * Cw}).permute({0, 2, 3, 1}).contiguous();
}

int64_t block_lanes() { return kOB; }

std::string build_features() {
  std::string f;
#if defined(__AVX512VPOPCNTDQ__)
  f += "avx512-vpopcntdq ";
#endif
#if defined(__AVX512F__)
  f += "avx512f ";
#endif
#if defined(__AVX2__)
  f += "avx2 ";
#endif
#if defined(__POPCNT__)
  f += "popcnt ";
#endif
#if defined(_OPENMP)
  f += "openmp";
#endif
  return f;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_activations", &pack_activations, "sign-pack an NCHW tensor into padded NHWC 64-bit words");
  m.def("xnor_conv2d", &xnor_conv2d, "XNOR/popcount convolution of packed activations and weights");
  m.def("interleave_weights", &interleave_weights, "reorder packed weights into output-channel blocks");
  m.def("mix_mean", &mix_mean, "per-channel mean of g*x_mix + (1-g)*b");
  m.def("gate_affine_residual", &gate_affine_residual, "fma(s*b[*r], scale, shift) + r");
  m.def("pool2x2_prelu", &pool2x2_prelu, "avg_pool2x2(x) and avg_pool2x2(prelu(x)) in one pass");
  m.def("block_lanes", &block_lanes, "output channels per weight block");
  m.def("build_features", &build_features, "instruction-set features the extension was compiled with");
}
