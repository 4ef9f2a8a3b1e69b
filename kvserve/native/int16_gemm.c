/* y [M, N] = x [M, K] W^T on int4 or int8 weights for many rows (prompts, batched decodes), as
   integer products: activations are rounded to int16 per group of the weight (15 bits of its
   largest value: as precise as qmatmul.c's two int8 digits), weights unpacked to int16, and
   vpmaddwd does 16 multiply-adds where an FMA does 8 (vpdpwssd on AVX-512 VNNI: 32, with the add).
   On AVX2 with the adds that accumulate them this runs ~1.2x float FMA tiles on SmolLM2's shapes;
   int8 activations would run faster but cost SmolLM2 3 points of top-1 agreement with
   transformers. Each group's integer sums then take one float multiply-add for the weights'
   scales, and one for their zero' (0 for int8) times the activations' sum.
   Included by gemm.c, whose blocking (panels of 16 output columns, K in slices) this follows. */
#include <math.h>
#include <string.h>

#include "int4_scales.h"

/* x [M, K] -> x ~ xq * xd per group of G, and xs = xd * sum(xq) (the sum of the approximations,
   so the rounding of zero' * sum cancels as in qmatmul.c). Runs on the calling team's threads;
   8 values at a time (G is a multiple of 8 here), as the scalar definition rounds them. */
static void quantize_int16(const float *x, int64_t M, int64_t K, int64_t G, int16_t *xq, float *xd, float *xs)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < M * K / G; i++) {
        const float *v = x + i * G;
        __m256 amax8 = _mm256_setzero_ps();
        for (int64_t j = 0; j < G; j += 8)
            amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / 32767, inv = d > 0 ? 1 / d : 0;
        __m256i sum8 = _mm256_setzero_si256();
        for (int64_t j = 0; j < G; j += 8) {  /* cvtps2dq rounds to nearest even, as nearbyintf does */
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j), _mm256_set1_ps(inv)));
            sum8 = _mm256_add_epi32(sum8, q);
            const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storeu_si128((__m128i *)(xq + i * G + j), q16);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        xd[i] = d;
        xs[i] = d * _mm_cvtsi128_si32(s4);
    }
}

/* Columns k0..k1-1 (whole groups) of the weight's rows n0..n0+15: per column pair (k, k+1), 8 rows'
   (k, k+1) int16 pairs for rows 0-7, then for rows 8-15; and per group, the 16 rows' scales then
   their zero's (the weight at q = 0) in `group_scales` */
static void int4_panel16(const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K, int64_t G, int64_t block,
                         int64_t n0, int64_t k0, int64_t k1, int16_t *panel, float *group_scales)
{
    const int64_t half = block / 2, nb = n0 / block, within = n0 % block;
    const int shift = within >= half ? 4 : 0;
    const uint8_t *bytes = w + nb * K * half + within % half;
    const __m128i low4 = _mm_set1_epi8(15);
    for (int64_t k = k0; k < k1; k += 2) {
        const __m128i a = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(bytes + k * half)), shift), low4);
        const __m128i b = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(bytes + (k + 1) * half)), shift),
                                        low4);
        _mm256_store_si256((__m256i *)(panel + (k - k0) * NR), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)));
        _mm256_store_si256((__m256i *)(panel + (k - k0) * NR + 16), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)));
    }
    for (int64_t g = k0 / G; g < k1 / G; g++) {
        float *s = group_scales + (g - k0 / G) * 2 * NR;
        for (int h = 0; h < 2; h++) {
            __m256 scale, zero0;
            load_scales(scales + (g * N + n0 + 8 * h) * 2, &scale, &zero0);
            _mm256_store_ps(s + 8 * h, scale);
            _mm256_store_ps(s + NR + 8 * h, zero0);
        }
    }
}

/* int4_panel16's layout from an int8 weight (GGUF's Q8_0: rows [N, K], a float scale per group of
   G, w = q * scale), zero's 0: 8 rows x 8 column pairs at a time, transposed as 32-bit elements
   (G a multiple of 16) */
static void int8_panel16(const int8_t *w, const float *scales, int64_t K, int64_t G, int64_t n0, int64_t k0,
                         int64_t k1, int16_t *panel, float *group_scales)
{
    for (int64_t k = k0; k < k1; k += 16)
        for (int64_t h = 0; h < 2; h++) {
            __m256 v[8];
            for (int64_t j = 0; j < 8; j++)
                v[j] = _mm256_castsi256_ps(_mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(w + (n0 + 8 * h + j) * K + k))));
            transpose8(v);  /* v[c]: column pair c of the 8 rows */
            for (int64_t c = 0; c < 8; c++)
                _mm256_store_si256((__m256i *)(panel + ((k - k0) / 2 + c) * 2 * NR + NR * h),
                                   _mm256_castps_si256(v[c]));
        }
    for (int64_t g = k0 / G; g < k1 / G; g++) {
        float *s = group_scales + (g - k0 / G) * 2 * NR;
        for (int64_t n = 0; n < NR; n++) {
            s[n] = scales[(n0 + n) * (K / G) + g];
            s[NR + n] = 0;
        }
    }
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TILE_PANELS 2  /* panels a tile reads: 32 columns, so each broadcast row value feeds two products */

/* kernel16 (below, AVX2) on AVX-512 VNNI over `panels` (1 or 2) adjacent panels, `pstride` and
   `sstride` apart: a column pair's 16 rows are one register, and vpdpwssd multiplies and
   accumulates in one instruction (vpmaddwd then vpaddd there). The same integer sums and float
   steps, so the same results. */
static inline __attribute__((always_inline)) void kernel_512(const int16_t *x, int64_t ldx, const float *xd,
                                                            const float *xs, int64_t ldg, const int16_t *panel,
                                                            int64_t pstride, const float *group_scales,
                                                            int64_t sstride, int64_t K, int64_t G, float *y,
                                                            int64_t ldy, int rows, int panels, int accumulate)
{
    __m512 out[8][2];
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < panels; h++)
            out[r][h] = accumulate ? _mm512_loadu_ps(y + r * ldy + NR * h) : _mm512_setzero_ps();
    for (int64_t g = 0; g < K / G; g++) {
        __m512i sum[8][2];
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < panels; h++)
                sum[r][h] = _mm512_setzero_si512();
        #pragma GCC unroll 16
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            __m512i b[2];
            for (int h = 0; h < panels; h++)
                b[h] = _mm512_loadu_si512((const void *)(panel + h * pstride + k * NR));
            for (int r = 0; r < rows; r++) {
                int32_t both;
                memcpy(&both, x + r * ldx + k, 4);
                const __m512i a = _mm512_set1_epi32(both);
                for (int h = 0; h < panels; h++)
                    sum[r][h] = _mm512_dpwssd_epi32(sum[r][h], a, b[h]);
            }
        }
        for (int h = 0; h < panels; h++) {
            const float *s = group_scales + h * sstride + g * 2 * NR;
            const __m512 scale = _mm512_loadu_ps(s), zero0 = _mm512_loadu_ps(s + NR);
            for (int r = 0; r < rows; r++) {
                const __m512 z = _mm512_fmadd_ps(zero0, _mm512_set1_ps(xs[r * ldg + g]), out[r][h]);
                out[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][h]),
                                            _mm512_mul_ps(scale, _mm512_set1_ps(xd[r * ldg + g])), z);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < panels; h++)
            _mm512_storeu_ps(y + r * ldy + NR * h, out[r][h]);
}

/* rows 0..M-1 of y[:, 16 * panels columns] (+)= x[:, k0..k0+kc) . panels; rows and panels constants
   in every call below, so the accumulators stay in registers (6 x 2 or 8 x 1 of 32) */
static void tiles16(const int16_t *x, int64_t M, int64_t ldx, const float *xd, const float *xs, int64_t ldg,
                    const int16_t *panel, int64_t pstride, const float *group_scales, int64_t sstride, int panels,
                    int64_t kc, int64_t G, float *y, int64_t ldy, int accumulate)
{
#define KERNEL(n, p) kernel_512(x, ldx, xd, xs, ldg, panel, pstride, group_scales, sstride, kc, G, y, ldy, n, p, \
                                accumulate)
    const int64_t mr = panels == 2 ? 6 : 8;
    int64_t m = 0;
    for (; m + mr <= M; m += mr, x += mr * ldx, xd += mr * ldg, xs += mr * ldg, y += mr * ldy)
        if (panels == 2) KERNEL(6, 2); else KERNEL(8, 1);
    if (panels == 2)
        switch (M - m) { case 1: KERNEL(1, 2); break; case 2: KERNEL(2, 2); break; case 3: KERNEL(3, 2); break;
                         case 4: KERNEL(4, 2); break; case 5: KERNEL(5, 2); break; }
    else
        switch (M - m) { case 1: KERNEL(1, 1); break; case 2: KERNEL(2, 1); break; case 3: KERNEL(3, 1); break;
                         case 4: KERNEL(4, 1); break; case 5: KERNEL(5, 1); break; case 6: KERNEL(6, 1); break;
                         case 7: KERNEL(7, 1); break; }
#undef KERNEL
}
#else
#define TILE_PANELS 1
#define I16_MR 3  /* rows a tile: 3 x 2 int32 sums and 3 x 2 float outputs fit the 16 registers */

/* y[r, 0..15] (+)= x[r, 0..K) . panel for `rows` (1..I16_MR) rows; xd and xs: the rows' group
   scales and sums, ldg apart. G is 32 for every GGUF format, hence the unrolling. */
static inline __attribute__((always_inline)) void kernel16(const int16_t *x, int64_t ldx, const float *xd,
                                                          const float *xs, int64_t ldg, const int16_t *panel,
                                                          const float *group_scales, int64_t K, int64_t G, float *y,
                                                          int64_t ldy, int rows, int accumulate)
{
    __m256 out[I16_MR][2];
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++)
            out[r][h] = accumulate ? _mm256_loadu_ps(y + r * ldy + 8 * h) : _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; g++) {
        /* below G * 128 * 32767 < 2^31: G up to 512 (int8 weights; int4: 4096) */
        __m256i sum[I16_MR][2];
        for (int r = 0; r < rows; r++)
            sum[r][0] = sum[r][1] = _mm256_setzero_si256();
        #pragma GCC unroll 16
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            const __m256i b0 = _mm256_load_si256((const __m256i *)(panel + k * NR));
            const __m256i b1 = _mm256_load_si256((const __m256i *)(panel + k * NR + 16));
            for (int r = 0; r < rows; r++) {
                int32_t both;
                memcpy(&both, x + r * ldx + k, 4);
                const __m256i a = _mm256_set1_epi32(both);
                sum[r][0] = _mm256_add_epi32(sum[r][0], _mm256_madd_epi16(a, b0));
                sum[r][1] = _mm256_add_epi32(sum[r][1], _mm256_madd_epi16(a, b1));
            }
        }
        const float *s = group_scales + g * 2 * NR;
        for (int h = 0; h < 2; h++) {
            const __m256 scale = _mm256_load_ps(s + 8 * h), zero0 = _mm256_load_ps(s + NR + 8 * h);
            for (int r = 0; r < rows; r++) {
                const __m256 z = _mm256_fmadd_ps(zero0, _mm256_broadcast_ss(xs + r * ldg + g), out[r][h]);
                out[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][h]),
                                            _mm256_mul_ps(scale, _mm256_broadcast_ss(xd + r * ldg + g)), z);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + r * ldy + 8 * h, out[r][h]);
}

/* rows 0..M-1 of y[:, 16 columns] (+)= x[:, k0..k0+kc) . panel (one: `panels` is 1) */
static void tiles16(const int16_t *x, int64_t M, int64_t ldx, const float *xd, const float *xs, int64_t ldg,
                    const int16_t *panel, int64_t pstride, const float *group_scales, int64_t sstride, int panels,
                    int64_t kc, int64_t G, float *y, int64_t ldy, int accumulate)
{
    (void)pstride, (void)sstride, (void)panels;
    int64_t m = 0;
    for (; m + I16_MR <= M; m += I16_MR)
        kernel16(x + m * ldx, ldx, xd + m * ldg, xs + m * ldg, ldg, panel, group_scales, kc, G, y + m * ldy, ldy,
                 I16_MR, accumulate);
    x += m * ldx, xd += m * ldg, xs += m * ldg, y += m * ldy;
    if (M - m == 1)
        kernel16(x, ldx, xd, xs, ldg, panel, group_scales, kc, G, y, ldy, 1, accumulate);
    else if (M - m == 2)
        kernel16(x, ldx, xd, xs, ldg, panel, group_scales, kc, G, y, ldy, 2, accumulate);
}
#endif

/* x [M, K], y [M, N]; N a multiple of 16, K of G. The weight: int4 (w4, bf16 scale pairs; N a
   multiple of `block`, a multiple of 32) as qmatmul.c's int4_matmul reads it, or int8 (w8, float
   scales; G a multiple of 16, at most 512). Returns 0, or -1 when out of memory. */
static int64_t int16_gemm(const float *x, int64_t M, const uint8_t *w4, const uint16_t *scales4, const int8_t *w8,
                          const float *scales8, int64_t N, int64_t K, int64_t G, int64_t block, float *y)
{
    /* K in even slices of at most ~600 columns, whole groups each: each slice costs the tiles a load
       and store of y, and a short last slice would pay them for little work */
    const int64_t slices_k = (K + 599) / 600, KC = ((K + slices_k - 1) / slices_k + G - 1) / G * G, MC = 48, NC = 16;
    const int64_t ldg = K / G;
    int16_t *xq = malloc(M * K * sizeof(int16_t));
    float *xd = malloc(M * ldg * sizeof(float)), *xs = malloc(M * ldg * sizeof(float));
    int64_t failed = 0;
    if (!xq || !xd || !xs) {
        free(xq);
        free(xd);
        free(xs);
        return -1;
    }
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num(), panels = N / NR;
        const int64_t first = panels * t / threads, end = panels * (t + 1) / threads;
        int16_t *slices = aligned_alloc(32, NC * KC * NR * sizeof(int16_t));
        float *slice_scales = aligned_alloc(32, NC * (KC / G) * 2 * NR * sizeof(float));
        if (!slices || !slice_scales)
            failed = 1;
        quantize_int16(x, M, K, G, xq, xd, xs);  /* with its barrier: every row's, for every thread */
        for (int64_t p0 = first; p0 < end && slices && slice_scales; p0 += NC) {
            const int64_t p1 = p0 + NC < end ? p0 + NC : end;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = k0 + KC < K ? k0 + KC : K;
                for (int64_t p = p0; p < p1; p++)
                    if (w4)
                        int4_panel16(w4, scales4, N, K, G, block, p * NR, k0, k1, slices + (p - p0) * KC * NR,
                                     slice_scales + (p - p0) * (KC / G) * 2 * NR);
                    else
                        int8_panel16(w8, scales8, K, G, p * NR, k0, k1, slices + (p - p0) * KC * NR,
                                     slice_scales + (p - p0) * (KC / G) * 2 * NR);
                for (int64_t m0 = 0; m0 < M; m0 += MC)
                    for (int64_t p = p0; p < p1; p += TILE_PANELS) {
                        const int panels = p + TILE_PANELS <= p1 ? TILE_PANELS : 1;
                        tiles16(xq + m0 * K + k0, M - m0 < MC ? M - m0 : MC, K, xd + m0 * ldg + k0 / G,
                                xs + m0 * ldg + k0 / G, ldg, slices + (p - p0) * KC * NR, KC * NR,
                                slice_scales + (p - p0) * (KC / G) * 2 * NR, (KC / G) * 2 * NR, panels, k1 - k0, G,
                                y + m0 * N + p * NR, N, k0 > 0);
                    }
            }
        }
        free(slices);
        free(slice_scales);
    }
    free(xq);
    free(xd);
    free(xs);
    return failed ? -1 : 0;
}

int64_t int4_gemm(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
                  int64_t G, int64_t block, float *y)
{
    return int16_gemm(x, M, w, scales, NULL, NULL, N, K, G, block, y);
}
