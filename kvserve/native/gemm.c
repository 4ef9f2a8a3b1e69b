/* y [M, N] = x [M, K] W^T in float32 for many rows (batched decodes, prompts) on quantized weights:
   each thread unpacks W 16 output columns at a time into a float panel [K, 16] that stays in its
   cache, then runs a 6 x 16 register-blocked FMA kernel over every row of x. Unpacking once per
   panel costs 1/M of the products, and no float copy of the whole weight is ever written (which
   is what unpacking to a dense matrix for PyTorch's matmul costs), nor are activations emulated
   in bfloat16 (what PyTorch's int4 kernel does on CPUs without native bfloat16).
   Weight formats, as qmatmul.c reads them:
   - int4: _convert_weight_to_int4pack_for_cpu's blocks of `block` rows, bf16 (scale, zero) pairs
     [K/G, N, 2], w = (q - 8) * scale + zero;
   - int8: rows [N, K] with a float scale per group of G, w = q * scale (GGUF's Q8_0). */
#include <stdint.h>
#include <stdlib.h>

#include "kv_element.h"

#define NR 16
#define MR 6

#ifdef __AVX2__
#include <immintrin.h>

int64_t gemm_available(void) { return 1; }

/* y[r, 0..15] (+)= x[r, :] . panel for `rows` (1..MR) rows: the accumulators live in registers when
   `rows` is a constant, which the switch in tile() makes it */
static inline __attribute__((always_inline)) void kernel(const float *x, int64_t ldx, const float *panel, int64_t K,
                                                        float *y, int64_t ldy, int rows)
{
    __m256 acc[MR][2];
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_load_ps(panel + k * NR), b1 = _mm256_load_ps(panel + k * NR + 8);
        for (int r = 0; r < rows; r++) {
            const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

static void tile(const float *x, int64_t M, int64_t K, const float *panel, float *y, int64_t N)
{
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
        kernel(x + m * K, K, panel, K, y + m * N, N, MR);
    switch (M - m) {
    case 1: kernel(x + m * K, K, panel, K, y + m * N, N, 1); break;
    case 2: kernel(x + m * K, K, panel, K, y + m * N, N, 2); break;
    case 3: kernel(x + m * K, K, panel, K, y + m * N, N, 3); break;
    case 4: kernel(x + m * K, K, panel, K, y + m * N, N, 4); break;
    case 5: kernel(x + m * K, K, panel, K, y + m * N, N, 5); break;
    }
}

/* 16 rows' float (scale, zero - 8 * scale) of group g from their bf16 pairs */
static inline void int4_scales(const uint16_t *pairs, __m256 scale[2], __m256 zero0[2])
{
    for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(pairs + 16 * h));
        scale[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
        zero0[h] = _mm256_fnmadd_ps(_mm256_set1_ps(8), scale[h], zero);
    }
}

/* Panel p of the int4 weight: output rows n0..n0+15, read from 16 bytes per column k (low or high
   nibbles) of their block. */
static void int4_panel(const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K, int64_t G,
                       int64_t block, int64_t n0, float *panel)
{
    const int64_t half = block / 2, nb = n0 / block, within = n0 % block;
    const int shift = within >= half ? 4 : 0;
    const uint8_t *bytes = w + nb * K * half + within % half;
    for (int64_t g = 0; g < K / G; g++) {
        __m256 scale[2], zero0[2];
        int4_scales(scales + (g * N + n0) * 2, scale, zero0);
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            const __m128i b = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(bytes + k * half)), shift),
                                            _mm_set1_epi8(15));
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
            _mm256_store_ps(panel + k * NR, _mm256_fmadd_ps(q0, scale[0], zero0[0]));
            _mm256_store_ps(panel + k * NR + 8, _mm256_fmadd_ps(q1, scale[1], zero0[1]));
        }
    }
}

/* 8 vectors (rows) of 8 floats, transposed in place */
static inline void transpose8(__m256 v[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            u[4 * i + h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], 0x44);
            u[4 * i + 2 + h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], 0xEE);
        }
    /* u[0..3]: columns 0, 2, 1, 3 of rows 0-3 (each lane half), u[4..7] the same for rows 4-7 */
    const int order[4] = {0, 2, 1, 3};
    for (int c = 0; c < 4; c++) {
        v[c] = _mm256_permute2f128_ps(u[order[c]], u[4 + order[c]], 0x20);
        v[4 + c] = _mm256_permute2f128_ps(u[order[c]], u[4 + order[c]], 0x31);
    }
}

/* Panel of the int8 weight: rows n0..n0+15 transposed to [K, 16] with their groups' scales, 8 rows
   by 8 columns at a time (G a multiple of 8) */
static void int8_panel(const int8_t *w, const float *scales, int64_t K, int64_t G, int64_t n0, float *panel)
{
    for (int64_t k = 0; k < K; k += 8)
        for (int64_t h = 0; h < 2; h++) {
            __m256 v[8];
            for (int64_t j = 0; j < 8; j++) {
                const int64_t n = n0 + 8 * h + j;
                const __m128i q = _mm_loadl_epi64((const __m128i *)(w + n * K + k));
                v[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(scales[n * (K / G) + k / G]));
            }
            transpose8(v);
            for (int64_t c = 0; c < 8; c++)
                _mm256_store_ps(panel + (k + c) * NR + 8 * h, v[c]);
        }
}

/* x [M, K], y [M, N]; N a multiple of 16; for int4, G a multiple of 1 and `block` of 32 */
void int4_gemm(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
               int64_t G, int64_t block, float *y)
{
    #pragma omp parallel
    {
        float *panel = aligned_alloc(32, K * NR * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NR) {
            int4_panel(w, scales, N, K, G, block, n0, panel);
            tile(x, M, K, panel, y + n0, N);
        }
        free(panel);
    }
}

void int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
               int64_t G, float *y)
{
    #pragma omp parallel
    {
        float *panel = aligned_alloc(32, K * NR * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NR) {
            int8_panel(w, scales, K, G, n0, panel);
            tile(x, M, K, panel, y + n0, N);
        }
        free(panel);
    }
}
#else
int64_t gemm_available(void) { return 0; }  /* callers keep PyTorch's kernels */

void int4_gemm(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
               int64_t G, int64_t block, float *y) {}

void int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
               int64_t G, float *y) {}
#endif
