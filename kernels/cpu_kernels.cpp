// gsopt's CPU kernels (kernels/cpu_kernels.py builds them and says why each exists).
//
// int4: one row times an int4 weight in torchao's CPU layout, on the int8 dot-product units;
// and a prefill's rows times it, unpacked to bf16 a slice of columns at a time.
//
// torchao's `Int4OpaqueTensor` (A16W4) keeps the weight packed for `_weight_int4pack_mm_for_cpu`:
// on AVX-512, blocks of 64 output rows, each k's 32 bytes holding rows d and d + 32 (low and
// high nibble of byte d) and rows d + 16 and d + 48 (byte 16 + d); a short last block of t
// rows holds row pairs (n, n + 1) in byte k * t / 2 + n / 2. Values q are 0..15 and, per group
// of K, the weight is (q - 8) * scale + zero (bf16 pairs in `scale_and_zero` [K / group, N, 2]).
//
// The row is quantized per group to int8 (a symmetric scale per group), as llama.cpp's q4 x q8
// product does, so that four k at a time multiply on VNNI: `vpdpbusd` takes the weights as
// unsigned bytes and the activations as signed ones. `vpermt2b` (AVX512-VBMI) gathers each
// row's four k into one 32-bit lane. Per group and row:
//   y += scale * a_g * (sum_k xq_k q_k - 8 sum_k xq_k) + zero * sum_k x_k
// with a_g the group's activation scale, accumulated in fp32.
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

struct QuantizedRow {
  std::vector<int8_t> values;  // K
  std::vector<int32_t> quads;  // K / 4: four int8 values as one broadcastable lane
  std::vector<float> scale;    // per group
  std::vector<float> sum;      // per group: sum of the float values
  std::vector<int32_t> qsum;   // per group: sum of the int8 values
};

// Reused across calls (a decode step makes one per linear): no allocation per call.
thread_local QuantizedRow row_buffer;

template <typename T>
const QuantizedRow& quantize_row(const T* x, int64_t K, int64_t group) {
  const int64_t groups = K / group;
  QuantizedRow& row = row_buffer;
  row.values.resize(K);
  row.quads.resize(K / 4);
  row.scale.resize(groups);
  row.sum.resize(groups);
  row.qsum.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const float v = static_cast<float>(x[k]);
      amax = std::max(amax, std::fabs(v));
      sum += v;
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    int32_t qsum = 0;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(x[k]) / scale));
      row.values[k] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
      qsum += row.values[k];
    }
    row.scale[g] = scale;
    row.sum[g] = sum;
    row.qsum[g] = qsum;
  }
  std::memcpy(row.quads.data(), row.values.data(), K);
  return row;
}

inline float bf16_to_float(const at::BFloat16 v) { return static_cast<float>(v); }

// `vpermt2b` indices, made once: byte 4d + j of a lane takes k + j's byte d (rows d of a
// nibble half, `first`) or 16 + d (rows 16 + d, `second`); k + 2 and k + 3 are in the second
// source, from index 64.
struct GatherIndices {
  alignas(64) uint8_t first[64];
  alignas(64) uint8_t second[64];
  constexpr GatherIndices() : first(), second() {
    for (int d = 0; d < 16; ++d)
      for (int j = 0; j < 4; ++j) {
        first[4 * d + j] = static_cast<uint8_t>(32 * j + d);
        second[4 * d + j] = static_cast<uint8_t>(32 * j + 16 + d);
      }
  }
};
constexpr GatherIndices kGather{};

// Rows [64 * block, 64 * block + 64): four accumulators of 16 rows.
template <typename T>
void block_product(const uint8_t* packed, const at::BFloat16* scale_zero, const QuantizedRow& x,
                   int64_t block, int64_t K, int64_t N, int64_t group, T* out) {
  const uint8_t* base = packed + block * K * (kBlock / 2);
  const __m512i gather0 = _mm512_load_si512(kGather.first);
  const __m512i gather1 = _mm512_load_si512(kGather.second);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  const int64_t groups = K / group;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
      // bytes of k, k + 1 (a) and k + 2, k + 3 (b): 32 bytes each
      const __m512i a = _mm512_loadu_si512(base + k * 32);
      const __m512i b = _mm512_loadu_si512(base + k * 32 + 64);
      const __m512i a_low = _mm512_and_si512(a, nibble);
      const __m512i b_low = _mm512_and_si512(b, nibble);
      const __m512i a_high = _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble);
      const __m512i b_high = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
      const __m512i xq = _mm512_set1_epi32(x.quads[k / 4]);
      dot[0] = _mm512_dpbusd_epi32(dot[0], _mm512_permutex2var_epi8(a_low, gather0, b_low), xq);
      dot[1] = _mm512_dpbusd_epi32(dot[1], _mm512_permutex2var_epi8(a_low, gather1, b_low), xq);
      dot[2] = _mm512_dpbusd_epi32(dot[2], _mm512_permutex2var_epi8(a_high, gather0, b_high), xq);
      dot[3] = _mm512_dpbusd_epi32(dot[3], _mm512_permutex2var_epi8(a_high, gather1, b_high), xq);
    }
    const __m512i shift = _mm512_set1_epi32(8 * x.qsum[g]);
    const __m512 a_g = _mm512_set1_ps(x.scale[g]);
    const __m512 sum = _mm512_set1_ps(x.sum[g]);
    const at::BFloat16* sz = scale_zero + (g * N + block * kBlock) * 2;
    for (int r = 0; r < 4; ++r) {
      // 16 rows' (scale, zero) bf16 pairs: a 32-bit lane each, scale in the low half
      const __m512i pairs = _mm512_loadu_si512(sz + 32 * r);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      const __m512 centred = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r], shift)), a_g);
      acc[r] = _mm512_fmadd_ps(scale, centred, acc[r]);
      acc[r] = _mm512_fmadd_ps(zero, sum, acc[r]);
    }
  }
  alignas(64) float result[kBlock];
  for (int r = 0; r < 4; ++r) _mm512_store_ps(result + 16 * r, acc[r]);
  for (int64_t n = 0; n < kBlock; ++n) out[block * kBlock + n] = static_cast<T>(result[n]);
}

// The short last block, row pairs per byte: plain loops over the same quantized row.
template <typename T>
void tail_product(const uint8_t* packed, const at::BFloat16* scale_zero, const QuantizedRow& x,
                  int64_t first_row, int64_t K, int64_t N, int64_t group, T* out) {
  const int64_t rows = N - first_row;
  const uint8_t* base = packed + first_row * K / 2;
  for (int64_t n = 0; n < rows; ++n) {
    float y = 0.f;
    for (int64_t g = 0; g < K / group; ++g) {
      int32_t dot = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const uint8_t byte = base[k * rows / 2 + n / 2];
        dot += static_cast<int32_t>((n % 2 ? byte >> 4 : byte) & 0x0F) * x.values[k];
      }
      const at::BFloat16* sz = scale_zero + (g * N + first_row + n) * 2;
      y += bf16_to_float(sz[0]) * x.scale[g] * static_cast<float>(dot - 8 * x.qsum[g]) +
           bf16_to_float(sz[1]) * x.sum[g];
    }
    out[first_row + n] = static_cast<T>(y);
  }
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed,
                     const at::Tensor& scale_and_zero, int64_t group_size, int64_t rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "int4_gemv takes one row [1, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8");
  TORCH_CHECK(scale_and_zero.scalar_type() == at::kBFloat16 && scale_and_zero.is_contiguous(),
              "scale_and_zero: contiguous bf16 [K / group, N, 2]");
  const int64_t K = x.size(1), N = rows;
  TORCH_CHECK(K % group_size == 0 && group_size % 4 == 0, "K must be whole groups");
  TORCH_CHECK(packed.numel() == N * K / 2, "packed holds ", packed.numel(), " bytes, not N*K/2");
  TORCH_CHECK(scale_and_zero.numel() == K / group_size * N * 2, "scale_and_zero's shape");
  const at::Tensor row = x.contiguous();
  at::Tensor out = at::empty({1, N}, x.options());
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_and_zero.data_ptr<at::BFloat16>();
  const int64_t blocks = N / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int4_gemv", [&] {
    const QuantizedRow& quantized = quantize_row(row.data_ptr<scalar_t>(), K, group_size);
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        block_product(weights, sz, quantized, b, K, N, group_size, y);
    });
    if (blocks * kBlock < N)
      tail_product(weights, sz, quantized, blocks * kBlock, K, N, group_size, y);
  });
  return out;
}

// Columns [64 * first, 64 * (first + blocks)) of the weight transposed, [K, N] in bf16, into
// `w` (row stride `stride`): in the AVX-512 layout each k's 32 bytes of a 64-row block are
// that block's 64 consecutive columns, low nibbles first, so each output row is written in
// order.
void unpack_blocks(const uint8_t* weights, const at::BFloat16* sz, int64_t K, int64_t N,
                   int64_t group, int64_t first, int64_t blocks, at::BFloat16* w,
                   int64_t stride) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 eight = _mm512_set1_ps(8.f);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const at::BFloat16* sz_k = sz + (k / group) * N * 2;
      for (int64_t b = first; b < first + blocks; ++b) {
        const uint8_t* bytes = weights + b * K * (kBlock / 2) + k * 32;
        const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
        const __m256i low = _mm256_and_si256(both, nibble);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
        const __m128i parts[4] = {_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1),
                                  _mm256_castsi256_si128(high),
                                  _mm256_extracti128_si256(high, 1)};
        for (int r = 0; r < 4; ++r) {
          const int64_t n = b * kBlock + 16 * r;
          const __m512i pairs = _mm512_loadu_si512(sz_k + 2 * n);
          const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
          const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
          const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[r]));
          const __m512 value = _mm512_fmadd_ps(_mm512_sub_ps(q, eight), scale, zero);
          // to bf16, rounding to nearest even: add 0x7FFF and the kept lowest bit
          const __m512i bits = _mm512_castps_si512(value);
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
          const __m512i rounded =
              _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + k * stride + n - first * kBlock),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
        }
      }
    }
  });
}

// The short last block's columns (row pairs per byte), by loops, into `w` [K, tail].
void unpack_tail(const uint8_t* weights, const at::BFloat16* sz, int64_t K, int64_t N,
                 int64_t group, at::BFloat16* w) {
  const int64_t first = N / kBlock * kBlock, tail = N - first;
  const uint8_t* base = weights + first * K / 2;
  for (int64_t k = 0; k < K; ++k) {
    const at::BFloat16* sz_k = sz + (k / group) * N * 2;
    for (int64_t t = 0; t < tail; ++t) {
      const uint8_t byte = base[k * tail / 2 + t / 2];
      const float q = static_cast<float>((t % 2 ? byte >> 4 : byte) & 0x0F);
      const int64_t n = first + t;
      w[k * tail + t] = static_cast<at::BFloat16>(
          (q - 8.f) * bf16_to_float(sz_k[2 * n]) + bf16_to_float(sz_k[2 * n + 1]));
    }
  }
}

void check_weight(const at::Tensor& packed, const at::Tensor& scale_and_zero, int64_t group,
                  int64_t rows, int64_t cols) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8");
  TORCH_CHECK(scale_and_zero.scalar_type() == at::kBFloat16 && scale_and_zero.is_contiguous(),
              "scale_and_zero: contiguous bf16 [K / group, N, 2]");
  TORCH_CHECK(packed.numel() == rows * cols / 2 && cols % group == 0, "packed's shape");
  TORCH_CHECK(scale_and_zero.numel() == cols / group * rows * 2, "scale_and_zero's shape");
}

// x [M, K] times the weight, [M, N]: unpacked to bf16 a slice of columns at a time into a
// buffer that stays in cache, each slice multiplied as it is made (a whole weight unpacked
// first is written out to memory and read back).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& scale_and_zero, int64_t group_size, int64_t rows) {
  TORCH_CHECK(x.dim() == 2, "int4_linear takes rows [M, K]");
  const int64_t K = x.size(1), N = rows, blocks = N / kBlock;
  check_weight(packed, scale_and_zero, group_size, rows, K);
  const at::Tensor a = x.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty({x.size(0), N}, a.options());
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_and_zero.data_ptr<at::BFloat16>();
  // 1 MiB of bf16 per slice at most: the slice, its rows of x and of the output fit in L2
  const int64_t slice = std::max<int64_t>(1, std::min(blocks, (1 << 22) / (K * kBlock)));
  at::Tensor buffer = at::empty({K * slice * kBlock}, a.options());
  for (int64_t first = 0; first < blocks; first += slice) {
    const int64_t count = std::min(slice, blocks - first), width = count * kBlock;
    at::Tensor w = buffer.narrow(0, 0, K * width).view({K, width});
    unpack_blocks(weights, sz, K, N, group_size, first, count, w.data_ptr<at::BFloat16>(),
                  width);
    out.narrow(1, first * kBlock, width).copy_(at::mm(a, w));
  }
  if (blocks * kBlock < N) {
    at::Tensor tail = at::empty({K, N - blocks * kBlock}, a.options());
    unpack_tail(weights, sz, K, N, group_size, tail.data_ptr<at::BFloat16>());
    out.narrow(1, blocks * kBlock, N - blocks * kBlock).copy_(at::mm(a, tail));
  }
  return out.to(x.scalar_type());
}

// One bf16 row times a bf16 weight [N, K] (row-major), on the BF16 dot-product units
// (`vdpbf16ps`: pairs of bf16 products summed in fp32). Inductor's reduction for the same
// product converts every weight to fp32 first and stays near 38 GB/s on these cores; this
// reads at the memory's rate. Four rows at a time, 32 k per instruction.
__attribute__((target("avx512f,avx512bf16"))) void bf16_rows(
    const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t first, int64_t end,
    float* y) {
  int64_t n = first;
  for (; n + 4 <= end; n += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k));
    }
    for (int r = 0; r < 4; ++r) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t j = k; j < K; ++j)
        sum += static_cast<float>(x[j]) * static_cast<float>(w[(n + r) * K + j]);
      y[n + r] = sum;
    }
  }
  for (; n < end; ++n) {
    float sum = 0.f;
    for (int64_t j = 0; j < K; ++j) sum += static_cast<float>(x[j]) * static_cast<float>(w[n * K + j]);
    y[n] = sum;
  }
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.numel() == x.size(-1) && x.scalar_type() == at::kBFloat16,
              "bf16_gemv takes one bf16 row");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.size(1) == x.size(-1),
              "bf16_gemv: weight [N, K] in bf16");
  const at::Tensor row = x.contiguous(), w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N}, row.options().dtype(at::kFloat));
  const at::BFloat16* xp = row.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* y = out.data_ptr<float>();
  // blocks of 64 rows (a multiple of the kernel's 4) per task
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    bf16_rows(xp, wp, K, begin * 64, std::min(N, end * 64), y);
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(at::kBFloat16).view(shape);
}

}  // namespace

TORCH_LIBRARY(gsopt_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size, int rows) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size, int rows) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(gsopt_cpu, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_linear", &int4_linear);
  m.impl("bf16_gemv", &bf16_gemv);
}
