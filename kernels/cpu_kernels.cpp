// gsopt's CPU kernels (kernels/cpu_kernels.py builds them and says why each exists).
//
// int4: rows times an int4 weight in torchao's CPU layout, on the int8 dot-product units
// (`int4_int8_linear`); or, keeping the rows in float, unpacked to bf16 a slice of columns at
// a time (`int4_linear`).
//
// torchao's `Int4OpaqueTensor` (A16W4) keeps the weight packed for `_weight_int4pack_mm_for_cpu`:
// on AVX-512, blocks of 64 output rows, each k's 32 bytes holding rows d and d + 32 (low and
// high nibble of byte d) and rows d + 16 and d + 48 (byte 16 + d); a short last block of t
// rows holds row pairs (n, n + 1) in byte k * t / 2 + n / 2. Values q are 0..15 and, per group
// of K, the weight is (q - 8) * scale + zero (bf16 pairs in `scale_and_zero` [K / group, N, 2]).
//
// Each row is quantized per group to int8 (a symmetric scale per group), as llama.cpp's q4 x q8
// product does, so that four k at a time multiply on VNNI: `vpdpbusd` takes the weights as
// unsigned bytes and the activations as signed ones. `vpermt2b` (AVX512-VBMI) gathers each
// weight row's four k into one 32-bit lane. Per group, row of x and row of the weight:
//   y += scale * (a_g * (sum_k xq_k q_k - 8 sum_k xq_k)) + zero * sum_k x_k
// with a_g the group's activation scale, accumulated in fp32. Tiles of up to 6 rows of x keep
// 6 x 64 int32 sums in registers; the weight's bytes are read once per call.
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

// Rows quantized to int8 per group, as four-value lanes (`quads`, [M, K / 4]) for `vpdpbusd`'s
// broadcast operand, and per row and group: the scale, the sum of the float values and the
// sum of the int8 ones ([M, K / group] each).
struct QuantizedRows {
  std::vector<int32_t> quads;
  std::vector<float> scale;
  std::vector<float> sum;
  std::vector<int32_t> qsum;
  int64_t K = 0, groups = 0;
  const int8_t* values(int64_t m) const {
    return reinterpret_cast<const int8_t*>(quads.data()) + m * K;
  }
};

// Reused across calls (a decode step makes one per linear): no allocation per call.
thread_local QuantizedRows rows_buffer;

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Per group: a symmetric scale amax / 127, values rounded half to even (the reference's
// torch.round). 16 values at a time: a prefill quantizes every row of every linear.
template <typename T>
const QuantizedRows& quantize_rows(const T* x, int64_t M, int64_t K, int64_t group) {
  QuantizedRows& rows = rows_buffer;
  rows.K = K;
  rows.groups = K / group;
  rows.quads.resize(M * K / 4);
  rows.scale.resize(M * rows.groups);
  rows.sum.resize(M * rows.groups);
  rows.qsum.resize(M * rows.groups);
  at::parallel_for(0, M * rows.groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / rows.groups, g = i % rows.groups;
      const T* in = x + m * K + g * group;
      int8_t* out = reinterpret_cast<int8_t*>(rows.quads.data()) + m * K + g * group;
      __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < group; k += 16) {
        const __m512 v = load16(in + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
      }
      const float top = _mm512_reduce_max_ps(amax);
      const float scale = top > 0.f ? top / 127.f : 1.f;
      const __m512 divisor = _mm512_set1_ps(scale);
      __m512i qsum = _mm512_setzero_si512();
      for (int64_t k = 0; k < group; k += 16) {
        const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(in + k), divisor),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i v = _mm512_max_epi32(_mm512_set1_epi32(-127),
                                           _mm512_min_epi32(_mm512_set1_epi32(127),
                                                            _mm512_cvtps_epi32(q)));
        qsum = _mm512_add_epi32(qsum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(v));
      }
      rows.scale[i] = scale;
      rows.sum[i] = _mm512_reduce_add_ps(sum);
      rows.qsum[i] = _mm512_reduce_add_epi32(qsum);
    }
  });
  return rows;
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

// A 64-row block's operand for `vpdpbusd`: per four k, 4 vectors of 16 rows (rows 0-15,
// 16-31, 32-47, 48-63), each 32-bit lane holding four k of one row. `vpermt2b` gathers them
// from the packed bytes: k and k + 1's 32 bytes (a), k + 2 and k + 3's (b).
struct PackedBlock {
  const uint8_t* base;
  __m512i gather0 = _mm512_load_si512(kGather.first);
  __m512i gather1 = _mm512_load_si512(kGather.second);
  __m512i nibble = _mm512_set1_epi8(0x0F);
  PackedBlock(const uint8_t* packed, int64_t block, int64_t K)
      : base(packed + block * K * (kBlock / 2)) {}
  // the vectors of k = 4 * step
  void load(int64_t step, __m512i w[4]) const {
    const __m512i a = _mm512_loadu_si512(base + step * 128);
    const __m512i b = _mm512_loadu_si512(base + step * 128 + 64);
    const __m512i a_low = _mm512_and_si512(a, nibble);
    const __m512i b_low = _mm512_and_si512(b, nibble);
    const __m512i a_high = _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble);
    const __m512i b_high = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
    w[0] = _mm512_permutex2var_epi8(a_low, gather0, b_low);
    w[1] = _mm512_permutex2var_epi8(a_low, gather1, b_low);
    w[2] = _mm512_permutex2var_epi8(a_high, gather0, b_high);
    w[3] = _mm512_permutex2var_epi8(a_high, gather1, b_high);
  }
};

// The same vectors gathered once into a buffer (K * 64 bytes), for many tiles of rows.
struct GatheredBlock {
  const __m512i* vectors;
  void load(int64_t step, __m512i w[4]) const {
    for (int r = 0; r < 4; ++r) w[r] = _mm512_load_si512(vectors + 4 * step + r);
  }
  static void gather(const PackedBlock& packed, int64_t K, __m512i* out) {
    for (int64_t step = 0; step < K / 4; ++step) {
      __m512i w[4];
      packed.load(step, w);
      for (int r = 0; r < 4; ++r) _mm512_store_si512(out + 4 * step + r, w[r]);
    }
  }
};

// `__m512i` may alias anything, so GCC keeps an array of them in memory; accumulators of
// this type stay in registers.
using Int32x16 = int32_t __attribute__((vector_size(64)));

// R rows (from row m) times one block, into `acc` [R, 64] (fp32, zeroed by the caller). Per
// group and row:
//   acc += scale * (a_g * (sum_k xq_k q_k - 8 sum_k xq_k)) + zero * sum_k x_k
// R * 4 int32 accumulators stay in registers over a group's k.
template <int R, typename Block>
void tile_product(const Block& weights, const at::BFloat16* scale_zero, const QuantizedRows& x,
                  int64_t m, int64_t block, int64_t N, int64_t group, float* acc) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t quads = x.K / 4;
  const int32_t* xq = x.quads.data() + m * quads;
  for (int64_t g = 0; g < x.groups; ++g) {
    Int32x16 dot[R][4];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) dot[i][r] = Int32x16{};
    for (int64_t s = g * group / 4; s < (g + 1) * group / 4; ++s) {
      __m512i w[4];
      weights.load(s, w);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m512i v = _mm512_set1_epi32(xq[i * quads + s]);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) dot[i][r] = (Int32x16)_mm512_dpbusd_epi32((__m512i)dot[i][r], w[r], v);
      }
    }
    const at::BFloat16* sz = scale_zero + (g * N + block * kBlock) * 2;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      // 16 rows' (scale, zero) bf16 pairs: a 32-bit lane each, scale in the low half
      const __m512i pairs = _mm512_loadu_si512(sz + 32 * r);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int64_t at = (m + i) * x.groups + g;
        const __m512 centred =
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                              (__m512i)dot[i][r], _mm512_set1_epi32(8 * x.qsum[at]))),
                          _mm512_set1_ps(x.scale[at]));
        float* out = acc + i * kBlock + 16 * r;
        __m512 y = _mm512_fmadd_ps(scale, centred, _mm512_load_ps(out));
        _mm512_store_ps(out, _mm512_fmadd_ps(zero, _mm512_set1_ps(x.sum[at]), y));
      }
    }
  }
}

// Rows per tile: 6 * 4 accumulators and the block's 4 weight vectors fill the 32 registers.
// Up to kPackedRows rows gather from the packed bytes as they go (a decode step: the weight
// is read once, and the gathering is cheaper than a round trip through a buffer); more
// rows gather a block once into a buffer and reuse it for every tile (on [7168, 1024] at
// 8 rows: 0.24 ms against 0.31 through the buffer).
constexpr int kTileRows = 6;
constexpr int64_t kPackedRows = 8;

template <int R = kTileRows, typename Block>
void tile_rows(int64_t rows, const Block& weights, const at::BFloat16* scale_zero,
               const QuantizedRows& x, int64_t m, int64_t block, int64_t N, int64_t group,
               float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, weights, scale_zero, x, m, block, N, group, acc);
  }
  tile_product<R>(weights, scale_zero, x, m, block, N, group, acc);
}

// The short last block, row pairs per byte: plain loops over the same quantized rows.
template <typename T>
void tail_product(const uint8_t* packed, const at::BFloat16* scale_zero, const QuantizedRows& x,
                  int64_t M, int64_t first_row, int64_t N, int64_t group, T* out) {
  const int64_t rows = N - first_row, K = x.K;
  const uint8_t* base = packed + first_row * K / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < rows; ++n) {
      float y = 0.f;
      for (int64_t g = 0; g < x.groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t byte = base[k * rows / 2 + n / 2];
          dot += static_cast<int32_t>((n % 2 ? byte >> 4 : byte) & 0x0F) * x.values(m)[k];
        }
        const at::BFloat16* sz = scale_zero + (g * N + first_row + n) * 2;
        const int64_t at = m * x.groups + g;
        y += bf16_to_float(sz[0]) * (x.scale[at] * static_cast<float>(dot - 8 * x.qsum[at])) +
             bf16_to_float(sz[1]) * x.sum[at];
      }
      out[m * N + first_row + n] = static_cast<T>(y);
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

template <typename T>
void int4_int8_rows(const T* x, const uint8_t* weights, const at::BFloat16* sz, int64_t M,
                    int64_t K, int64_t N, int64_t group, T* y) {
  const int64_t blocks = N / kBlock;
  const QuantizedRows& quantized = quantize_rows(x, M, K, group);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // K / 4 steps of four vectors, 64-byte aligned (a std::vector of __m512i need not be)
    const std::unique_ptr<__m512i[], decltype(&std::free)> buffer(
        M > kPackedRows ? static_cast<__m512i*>(std::aligned_alloc(64, K * 64)) : nullptr,
        &std::free);
    alignas(64) float acc[kTileRows * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const PackedBlock packed(weights, b, K);
      if (M > kPackedRows) GatheredBlock::gather(packed, K, buffer.get());
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t tile = std::min<int64_t>(kTileRows, M - m);
        std::fill(acc, acc + tile * kBlock, 0.f);
        if (M > kPackedRows)
          tile_rows(tile, GatheredBlock{buffer.get()}, sz, quantized, m, b, N, group, acc);
        else
          tile_rows(tile, packed, sz, quantized, m, b, N, group, acc);
        for (int64_t i = 0; i < tile; ++i)
          for (int64_t n = 0; n < kBlock; ++n)
            y[(m + i) * N + b * kBlock + n] = static_cast<T>(acc[i * kBlock + n]);
      }
    }
  });
  if (blocks * kBlock < N) tail_product(weights, sz, quantized, M, blocks * kBlock, N, group, y);
}

// x [M, K] (fp32 or bf16) times the weight, [M, N] in x's dtype, x quantized to int8 per row
// and group.
at::Tensor int4_int8_linear(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale_and_zero, int64_t group_size, int64_t rows) {
  TORCH_CHECK(x.dim() == 2, "int4_int8_linear takes rows [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_int8_linear takes fp32 or bf16 rows");
  check_weight(packed, scale_and_zero, group_size, rows, x.size(1));
  TORCH_CHECK(group_size % 16 == 0, "the group size must be a multiple of 16");
  const at::Tensor a = x.contiguous();
  at::Tensor out = at::empty({x.size(0), rows}, x.options());
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_and_zero.data_ptr<at::BFloat16>();
  if (x.scalar_type() == at::kBFloat16)
    int4_int8_rows(a.data_ptr<at::BFloat16>(), weights, sz, x.size(0), x.size(1), rows,
                   group_size, out.data_ptr<at::BFloat16>());
  else
    int4_int8_rows(a.data_ptr<float>(), weights, sz, x.size(0), x.size(1), rows, group_size,
                   out.data_ptr<float>());
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

// One row times a weight [N, K] (row-major), read at the memory's rate: row by row, each a
// sequential read, four accumulators over k. Inductor's reduction for the same product reads fp32 weights at 14 GB/s
// on a 2-core Xeon (MKL 24), and converts bf16 ones to fp32 first (near 38 GB/s on a 2-core
// EPYC, below its memory's rate).
// bf16 on the BF16 dot-product units (`vdpbf16ps`: pairs of bf16 products summed in fp32),
// 32 k per instruction.
__attribute__((target("avx512f,avx512bf16"))) void bf16_rows(
    const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t first, int64_t end,
    float* y) {
  for (int64_t n = first; n < end; ++n) {
    const at::BFloat16* row = w + n * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 128 <= K; k += 128)
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(x + k + 32 * j),
                                  (__m512bh)_mm512_loadu_si512(row + k + 32 * j));
    for (; k + 32 <= K; k += 32)
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(x + k),
                                (__m512bh)_mm512_loadu_si512(row + k));
    float sum = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (; k < K; ++k) sum += static_cast<float>(x[k]) * static_cast<float>(row[k]);
    y[n] = sum;
  }
}

// fp32 on FMAs, 16 k per instruction.
void fp32_rows(const float* x, const float* w, int64_t K, int64_t first, int64_t end, float* y) {
  for (int64_t n = first; n < end; ++n) {
    const float* row = w + n * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * j),
                                 _mm512_loadu_ps(row + k + 16 * j), acc[j]);
    for (; k + 16 <= K; k += 16)
      acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(row + k), acc[0]);
    float sum = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (; k < K; ++k) sum += x[k] * row[k];
    y[n] = sum;
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.numel() == x.size(-1) && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "gemv takes one fp32 or bf16 row");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype && weight.size(1) == x.size(-1),
              "gemv: weight [N, K] in the row's dtype");
  const at::Tensor row = x.contiguous(), w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N}, row.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  // blocks of 64 rows per task
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    if (dtype == at::kBFloat16)
      bf16_rows(row.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), K, begin * 64,
                std::min(N, end * 64), y);
    else
      fp32_rows(row.data_ptr<float>(), w.data_ptr<float>(), K, begin * 64,
                std::min(N, end * 64), y);
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(dtype).view(shape);
}

}  // namespace

TORCH_LIBRARY(gsopt_cpu, m) {
  m.def("int4_int8_linear(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size, int rows) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size, int rows) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(gsopt_cpu, CPU, m) {
  m.impl("int4_int8_linear", &int4_int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("gemv", &gemv);
}
