/* y [M, N] = x [M, K] W^T for many rows (batched decodes, prompts) on quantized weights, blocked
   as BLIS/GotoBLAS do: each thread unpacks W 16 output columns by up to ~600 of K at a time into a
   panel that stays in its cache, then runs a register-blocked kernel over the rows of x.
   Unpacking once per panel costs 1/M of the products, and no float copy of the whole weight is
   ever written (which is what unpacking to a dense matrix for PyTorch's matmul costs), nor are
   activations emulated in bfloat16 (what PyTorch's int4 kernel does on CPUs without native
   bfloat16).
   Both weight kinds run as integer products on int16 activations, in int16_gemm.c:
   - int4 (_convert_weight_to_int4pack_for_cpu's blocks of `block` rows, bf16 (scale, zero) pairs
     [K/G, N, 2], w = (q - 8) * scale + zero; every linear layer);
   - int8 (GGUF's Q8_0: rows [N, K] with a float scale per group of G, w = q * scale; the logits,
     int8 linears): 1.3-1.7x the float panels and FMA kernel it had (M = 64-256, Q8_0 logits).
   The float 6 x 16 FMA kernel here (`tiles`) serves magicpig.c. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define NR 16
#define MR 6

#ifdef __AVX2__
#include <immintrin.h>

int64_t gemm_available(void) { return 1; }

/* y[r, 0..15] (+)= x[r, 0..K) . panel [K, 16] (rows ldb floats apart) for `rows` (1..MR) rows: the
   accumulators live in registers when `rows` is a constant, which the switch in tiles() makes it */
static inline __attribute__((always_inline)) void kernel(const float *x, int64_t ldx, const float *panel, int64_t ldb,
                                                        int64_t K, float *y, int64_t ldy, int rows, int accumulate)
{
    __m256 acc[MR][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = accumulate ? _mm256_loadu_ps(y + r * ldy) : _mm256_setzero_ps();
        acc[r][1] = accumulate ? _mm256_loadu_ps(y + r * ldy + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(panel + k * ldb), b1 = _mm256_loadu_ps(panel + k * ldb + 8);
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

/* rows 0..M-1 of y[:, 16 columns] (+)= x[:, k0..k0+kc) . panel */
static inline void tiles(const float *x, int64_t M, int64_t ldx, const float *panel, int64_t ldb, int64_t kc,
                         float *y, int64_t ldy, int accumulate)
{
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
        kernel(x + m * ldx, ldx, panel, ldb, kc, y + m * ldy, ldy, MR, accumulate);
    x += m * ldx, y += m * ldy;
    switch (M - m) {
    case 1: kernel(x, ldx, panel, ldb, kc, y, ldy, 1, accumulate); break;
    case 2: kernel(x, ldx, panel, ldb, kc, y, ldy, 2, accumulate); break;
    case 3: kernel(x, ldx, panel, ldb, kc, y, ldy, 3, accumulate); break;
    case 4: kernel(x, ldx, panel, ldb, kc, y, ldy, 4, accumulate); break;
    case 5: kernel(x, ldx, panel, ldb, kc, y, ldy, 5, accumulate); break;
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

#include "int16_gemm.c"

/* G a multiple of 16 */
int64_t int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                  int64_t G, float *y)
{
    return int16_gemm(x, M, NULL, NULL, w, scales, N, K, G, 0, y);
}
#else
int64_t gemm_available(void) { return 0; }  /* callers keep PyTorch's kernels */

int64_t int4_gemm(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
                  int64_t G, int64_t block, float *y) { return -1; }

int64_t int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                  int64_t G, float *y) { return -1; }
#endif
