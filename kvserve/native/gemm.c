/* y [M, N] = x [M, K] W^T for many rows (batched decodes, prompts) on quantized weights, blocked
   as BLIS/GotoBLAS do: each thread unpacks W 16 output columns by up to ~600 of K at a time into a
   panel that stays in its cache, then runs a register-blocked kernel over the rows of x.
   Unpacking once per panel costs 1/M of the products, and no float copy of the whole weight is
   ever written (which is what unpacking to a dense matrix for PyTorch's matmul costs), nor are
   activations emulated in bfloat16 (what PyTorch's int4 kernel does on CPUs without native
   bfloat16).
   - int8 (GGUF's Q8_0: rows [N, K] with a float scale per group of G, w = q * scale; the logits):
     float panels and a 6 x 16 FMA kernel, here; its `tiles` also serve magicpig.c.
   - int4 (_convert_weight_to_int4pack_for_cpu's blocks of `block` rows, bf16 (scale, zero) pairs
     [K/G, N, 2], w = (q - 8) * scale + zero; every linear layer): integer products, int4_gemm.c. */
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
static void tiles(const float *x, int64_t M, int64_t ldx, const float *panel, int64_t ldb, int64_t kc, float *y,
                  int64_t ldy, int accumulate)
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

/* Columns k0..k1-1 of the int8 weight's rows n0..n0+15, transposed, with their groups' scales, 8
   rows by 8 columns at a time (G a multiple of 8) */
static void int8_panel(const int8_t *w, const float *scales, int64_t K, int64_t G, int64_t n0, int64_t k0, int64_t k1,
                       float *panel)
{
    for (int64_t k = k0; k < k1; k += 8)
        for (int64_t h = 0; h < 2; h++) {
            __m256 v[8];
            for (int64_t j = 0; j < 8; j++) {
                const int64_t n = n0 + 8 * h + j;
                const __m128i q = _mm_loadl_epi64((const __m128i *)(w + n * K + k));
                v[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(scales[n * (K / G) + k / G]));
            }
            transpose8(v);
            for (int64_t c = 0; c < 8; c++)
                _mm256_store_ps(panel + (k - k0 + c) * NR + 8 * h, v[c]);
        }
}

/* Each thread takes a range of 16-column panels, NC of them at a time; for each slice of KC columns
   of K it unpacks those panels' slice once (KC x 16 floats each, ~L2 size for the NC of them), then
   for each block of MC rows of x (MC x KC floats, in L2) runs the 6 x 16 tiles over every panel.
   G a multiple of 8. Returns 0, or -1 when out of memory. */
int64_t int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                  int64_t G, float *y)
{
    /* K in even slices of at most ~600 columns, whole groups each: each slice costs the tiles a load
       and store of y, and a short last slice would pay them for little work. Slices of 512-576
       measured ~6% faster than of 192-256 on SmolLM2's shapes (the panel need not stay in L1: it is
       read two vectors per 12 FMAs). */
    const int64_t slices_k = (K + 599) / 600, KC = ((K + slices_k - 1) / slices_k + G - 1) / G * G, MC = 48, NC = 16;
    int64_t failed = 0;
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num(), panels = N / NR;
        const int64_t first = panels * t / threads, end = panels * (t + 1) / threads;
        float *slices = aligned_alloc(32, NC * KC * NR * sizeof(float));
        if (!slices)
            failed = 1;
        for (int64_t p0 = first; p0 < end && slices; p0 += NC) {
            const int64_t p1 = p0 + NC < end ? p0 + NC : end;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = k0 + KC < K ? k0 + KC : K;
                for (int64_t p = p0; p < p1; p++)
                    int8_panel(w, scales, K, G, p * NR, k0, k1, slices + (p - p0) * KC * NR);
                for (int64_t m0 = 0; m0 < M; m0 += MC)
                    for (int64_t p = p0; p < p1; p++)
                        tiles(x + m0 * K + k0, M - m0 < MC ? M - m0 : MC, K, slices + (p - p0) * KC * NR, NR, k1 - k0,
                              y + m0 * N + p * NR, N, k0 > 0);
            }
        }
        free(slices);
    }
    return failed ? -1 : 0;
}

#include "int4_gemm.c"
#else
int64_t gemm_available(void) { return 0; }  /* callers keep PyTorch's kernels */

int64_t int4_gemm(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
                  int64_t G, int64_t block, float *y) { return -1; }

int64_t int8_gemm(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                  int64_t G, float *y) { return -1; }
#endif
