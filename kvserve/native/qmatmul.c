/* Quantized weight x float activation matmuls for a few rows (decode):
   - int4 on the weight layout of PyTorch's _convert_weight_to_int4pack_for_cpu, so the same buffer
     serves both kernels;
   - int8 in groups with a float scale each (GGUF's Q8_0), for an int8 vocabulary table (lm_head;
     a 4-bit one runs on the int4 kernel).
   As llama.cpp does for Q4_1 x Q8_1, activations are quantized to int8 per group of the weight
   and the products summed as integers (AVX2 maddubs; AVX-512 VNNI vpdpbusd), one float multiply-add
   per group. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#include "int4_scales.h"
#include "kv_element.h"

/* The float32 weight of an int4 buffer (int4_matmul's layout), transposed: out [K, N], for
   prompts, whose many rows are cheaper through a dense matmul. Column k of a block of rows is
   block / 2 bytes in the buffer and block floats here, so both sides stream. */
void int4_dequantize_t(const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K, int64_t G, int64_t block,
                       float *out)
{
    const int64_t half = block / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; k++) {
        const uint16_t *pairs = scales + (k / G) * N * 2;
        for (int64_t nb = 0; nb < N / block; nb++) {
            const uint8_t *b = w + nb * K * half + k * half;
            float *o = out + k * N + nb * block;
            const uint16_t *p = pairs + nb * block * 2;
            for (int64_t h = 0; h < 2; h++)  /* rows 0..half-1: low nibbles, half..block-1: high */
                for (int64_t j = 0; j < half; j++) {
                    const float scale = bf16_to_float(p[2 * (h * half + j)]), zero = bf16_to_float(p[2 * (h * half + j) + 1]);
                    /* PyTorch's rounding: (q - 8) * scale + zero */
                    o[h * half + j] = ((float)((b[j] >> (4 * h)) & 15) - 8) * scale + zero;
                }
        }
    }
}

#ifdef __AVX2__
#include <immintrin.h>

int64_t qmatmul_available(void) { return 1; }

/* x [M, K] -> two int8 digits per value, x ~ (254 * xq + xr) * xd: xq rounds x to 127 steps of
   its group's max, xr the remainder to 254 finer steps (one digit alone loses a point and more of
   SmolLM2's top-1 agreement); per group of G, the scale xd and xs, the sum of those approximations
   (the sum of x itself would not cancel the rounding of q * scale against zero' * sum) */
static void quantize_activations(const float *x, int64_t M, int64_t K, int64_t G, int8_t *xq, int8_t *xr,
                                 float *xd, float *xs)
{
    for (int64_t i = 0; i < M * K / G; i++) {
        const float *v = x + i * G;
        float amax = 0;
        int64_t j = 0;
        /* eight at a time, the same float steps as the scalar loop below: libm's lrintf was a call a
           value, and this runs on one thread while the others wait (4% of a decode's time) */
        __m256 top = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; j + 8 <= G; j += 8)
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        amax = _mm_cvtss_f32(_mm_max_ss(top4, _mm_shuffle_ps(top4, top4, 1)));
        for (; j < G; j++)
            amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;  /* not fmaxf: a libm call */
        const float d = amax / 127, inv = d > 0 ? 1 / d : 0;
        __m256i sums = _mm256_setzero_si256();
        const __m256 vinv = _mm256_set1_ps(inv), steps = _mm256_set1_ps(254);
        for (j = 0; j + 8 <= G; j += 8) {
            const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(v + j), vinv);
            const __m256 q = _mm256_round_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i qi = _mm256_cvttps_epi32(q), ri = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(p, q), steps));
            sums = _mm256_add_epi32(sums, _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(qi, 8),
                                                                            _mm256_slli_epi32(qi, 1)), ri));
            const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
            const __m128i r16 = _mm_packs_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
            _mm_storel_epi64((__m128i *)(xq + i * G + j), _mm_packs_epi16(q16, q16));
            _mm_storel_epi64((__m128i *)(xr + i * G + j), _mm_packs_epi16(r16, r16));
        }
        __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4e));
        int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xb1)));
        for (; j < G; j++) {
            const float q = nearbyintf(v[j] * inv);
            xq[i * G + j] = (int8_t)q;
            xr[i * G + j] = (int8_t)lrintf((v[j] * inv - q) * 254);
            sum += 254 * xq[i * G + j] + xr[i * G + j];
        }
        xd[i] = d / 254;
        xs[i] = xd[i] * sum;
    }
}

/* (x[0], x[1]) repeated in every 16-bit lane */
static inline __m256i pair(const int8_t *x)
{
    int16_t both;
    memcpy(&both, x, 2);
    return _mm256_set1_epi16(both);
}

/* int16 sums of 16 rows (lanes: rows 0-3, 8-11 | 4-7, 12-15, column_pairs' order) of the coarse
   digit c and the fine one f -> int32 254 c + f added to rows 0-7 (lo) and 8-15 (hi): one unpack
   and one vpmaddwd per 8 rows, where sign extension and shifts took five shuffle-port ops */
static inline void widen(__m256i c, __m256i f, __m256i *lo, __m256i *hi)
{
    const __m256i digits = _mm256_set1_epi32(254 | (1 << 16));
    *lo = _mm256_add_epi32(*lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(c, f), digits));
    *hi = _mm256_add_epi32(*hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(c, f), digits));
}

/* The 16 bytes at p of column k and those of column k + 1 (`half` bytes on) as 16 byte pairs, one
   per byte position j: lane 0 holds j = 0-3 and 8-11, lane 1 j = 4-7 and 12-15, so that widen's
   in-lane unpacks put rows in order */
static inline __m256i column_pairs(const uint8_t *p, int64_t half)
{
    const __m256i both = half == 16 ? _mm256_loadu_si256((const __m256i *)p)
        : _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + half)), _mm_loadu_si128((const __m128i *)p));
    /* 4-byte quarters to (k 0-3, k 8-11, k+1 0-3, k+1 8-11 | the rest), then interleaved in each lane */
    const __m256i order = _mm256_permutevar8x32_epi32(both, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    return _mm256_shuffle_epi8(order, _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                                       0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15));
}

/* One row's integer sums over a group (columns g0..g0+G) for 32 weight rows: rows 16c + 0-7, 8-15
   (low nibbles), half + 16c + 0-7, 8-15 (high). The column pairs come unpacked in low/high
   (several rows share them), or, with `fused` (one row), straight from the weights at wc. */
static inline __attribute__((always_inline)) void group_products(const uint8_t *wc, int64_t half, const __m256i *low,
                                                                const __m256i *high, int fused, const int8_t *xm,
                                                                const int8_t *xrm, int64_t g0, int64_t G, __m256i sum[4])
{
    const __m256i low4 = _mm256_set1_epi8(15);
    sum[0] = sum[1] = sum[2] = sum[3] = _mm256_setzero_si256();
    for (int64_t k0 = g0; k0 < g0 + G; k0 += 16) {
        /* 8 column pairs: int16 sums stay below 8 * 2 * 15 * 127 < 2^15 */
        __m256i lo = _mm256_setzero_si256(), hi = lo, lo_r = lo, hi_r = lo;
        for (int64_t k = k0; k < k0 + 16; k += 2) {
            __m256i pl, ph;
            if (fused) {
                const __m256i pairs = column_pairs(wc + k * half, half);
                pl = _mm256_and_si256(pairs, low4);
                ph = _mm256_and_si256(_mm256_srli_epi16(pairs, 4), low4);
            } else
                pl = low[(k - g0) / 2], ph = high[(k - g0) / 2];
            const __m256i xk = pair(xm + k), xk_r = pair(xrm + k);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(pl, xk));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(ph, xk));
            lo_r = _mm256_add_epi16(lo_r, _mm256_maddubs_epi16(pl, xk_r));
            hi_r = _mm256_add_epi16(hi_r, _mm256_maddubs_epi16(ph, xk_r));
        }
        widen(lo, lo_r, &sum[0], &sum[1]);
        widen(hi, hi_r, &sum[2], &sum[3]);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define UNPACK_COLUMNS 4  /* columns an unpacked vector holds */
typedef __m512i unpacked;

/* Columns k..k+3 (`half` bytes apart from p) with each byte position's four bytes gathered into
   its 32-bit lane (vpermb): lane j's low nibbles (rows 16c + j) in lo, high (half + 16c + j) in hi */
static inline __attribute__((always_inline)) void unpack_columns(const uint8_t *p, int64_t half, unpacked *lo,
                                                                unpacked *hi)
{
    static const uint8_t quads[64] = {  /* byte 4j + i <- column i's byte j */
        0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
        6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
        12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + half)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * half)), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * half)), 3);
    v = _mm512_permutexvar_epi8(_mm512_loadu_si512((const void *)quads), v);
    *lo = _mm512_and_si512(v, low4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
}

/* group_products on AVX-512 VNNI: vpdpbusd multiplies four columns by the row's four activation
   digits and adds them in int32, ~2x fewer instructions than maddubs over column pairs, and the
   same integer sums, so the same results */
static inline __attribute__((always_inline)) void products(const uint8_t *wc, int64_t half, const unpacked *low,
                                                          const unpacked *high, int fused, const int8_t *xm,
                                                          const int8_t *xrm, int64_t g0, int64_t G, __m256i sum[4])
{
    __m512i lo = _mm512_setzero_si512(), hi = lo, lo_r = lo, hi_r = lo;
    for (int64_t k = g0; k < g0 + G; k += 4) {
        __m512i pl, ph;
        if (fused)
            unpack_columns(wc + k * half, half, &pl, &ph);
        else
            pl = low[(k - g0) / 4], ph = high[(k - g0) / 4];
        int32_t q4, r4;
        memcpy(&q4, xm + k, 4);
        memcpy(&r4, xrm + k, 4);
        const __m512i xq4 = _mm512_set1_epi32(q4), xr4 = _mm512_set1_epi32(r4);
        lo = _mm512_dpbusd_epi32(lo, pl, xq4);
        hi = _mm512_dpbusd_epi32(hi, ph, xq4);
        lo_r = _mm512_dpbusd_epi32(lo_r, pl, xr4);
        hi_r = _mm512_dpbusd_epi32(hi_r, ph, xr4);
    }
    const __m512i digit = _mm512_set1_epi32(254);
    const __m512i l = _mm512_add_epi32(_mm512_mullo_epi32(lo, digit), lo_r);
    const __m512i h = _mm512_add_epi32(_mm512_mullo_epi32(hi, digit), hi_r);
    sum[0] = _mm512_castsi512_si256(l), sum[1] = _mm512_extracti64x4_epi64(l, 1);
    sum[2] = _mm512_castsi512_si256(h), sum[3] = _mm512_extracti64x4_epi64(h, 1);
}
#else
#define UNPACK_COLUMNS 2
typedef __m256i unpacked;

static inline __attribute__((always_inline)) void unpack_columns(const uint8_t *p, int64_t half, unpacked *lo,
                                                                unpacked *hi)
{
    const __m256i pairs = column_pairs(p, half), low4 = _mm256_set1_epi8(15);
    *lo = _mm256_and_si256(pairs, low4);  /* rows 16c + 0-15 */
    *hi = _mm256_and_si256(_mm256_srli_epi16(pairs, 4), low4);  /* half + */
}
static inline __attribute__((always_inline)) void products(const uint8_t *wc, int64_t half, const unpacked *low,
                                                          const unpacked *high, int fused, const int8_t *xm,
                                                          const int8_t *xrm, int64_t g0, int64_t G, __m256i sum[4])
{
    group_products(wc, half, low, high, fused, xm, xrm, g0, G, sum);
}
#endif

/* out + 8 rows' group product: their integer sums times scale * d, plus zero' times the
   activations' sum s (their bf16 (scale, zero) pairs at `pairs`) */
static inline __m256 group_sum(__m256i isum, const uint16_t *pairs, __m256 d, __m256 s, __m256 out)
{
    __m256 scale, zero0;
    load_scales(pairs, &scale, &zero0);
    out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, d), out);
    return _mm256_fmadd_ps(zero0, s, out);
}

#define MATMUL_ROWS 8  /* rows that share one unpacking of a group's weights */

/* y [M, N] = x [M, K] W^T. W: per block of `block` rows, column k's block/2 bytes hold row j (low
   nibble) and row block/2 + j (high nibble); scales [K/G, N, 2] bf16 (scale, zero), w = (q - 8) *
   scale + zero. G: a multiple of 16, at most 256; scratch: 2 * M * K bytes + 2 * M * K / G floats.
   Each group of 32 weight rows x G columns is unpacked once (2 G x 32 bytes, in L1) for up
   to MATMUL_ROWS rows of x, whose products then run over it: a verification's k + 1 rows cost about
   one read of the weights plus their products, where the unpacking once per row cost as much as the
   products. Each row's arithmetic is the same whatever M, so a row comes out bit for bit as alone. */
void int4_matmul(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
                 int64_t G, int64_t block, float *y, void *scratch)
{
    int8_t *xq = scratch, *xr = xq + M * K;
    float *xd = (float *)(xr + M * K), *xs = xd + M * K / G;
    quantize_activations(x, M, K, G, xq, xr, xd, xs);
    const int64_t half = block / 2, chunks = N / block * (half / 16);
    #pragma omp parallel for schedule(static)  /* torch's OpenMP threads: the same libgomp */
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        /* rows nb*block + 16c.. (low nibbles) and + half (high) */
        const int64_t nb = chunk / (half / 16), c = chunk % (half / 16);
        const uint8_t *wc = w + nb * K * half + 16 * c;
        const int64_t rows[4] = {nb * block + 16 * c, nb * block + 16 * c + 8,
                                 nb * block + half + 16 * c, nb * block + half + 16 * c + 8};
        unpacked low[256 / UNPACK_COLUMNS], high[256 / UNPACK_COLUMNS];  /* a group's columns: G <= 256 */
        for (int64_t m0 = 0; m0 < M; m0 += MATMUL_ROWS) {
            const int64_t mr = M - m0 < MATMUL_ROWS ? M - m0 : MATMUL_ROWS;
            __m256 out[MATMUL_ROWS][4];
            for (int64_t m = 0; m < mr; m++)
                for (int i = 0; i < 4; i++)
                    out[m][i] = _mm256_setzero_ps();
            for (int64_t g = 0; g < K / G; g++) {
                /* two groups ahead: one row's products take too little time for the hardware
                   prefetcher to hide memory latency (~8 -> ~11-13 GB/s for the whole model) */
                for (int64_t f = 0; f < G * half; f += 64)
                    _mm_prefetch((const char *)(wc + (g + 2) * G * half + f), _MM_HINT_T0);
                if (mr > 1)  /* unpacked once for the rows */
                    for (int64_t k = g * G; k < (g + 1) * G; k += UNPACK_COLUMNS)
                        unpack_columns(wc + k * half, half, &low[(k - g * G) / UNPACK_COLUMNS],
                                       &high[(k - g * G) / UNPACK_COLUMNS]);
                const uint16_t *group_pairs = scales + g * N * 2;
                /* this group's scales for the next block of rows (the thread's next chunk, in
                   static order): a stream per group is more than the prefetcher follows, and two
                   groups ahead was too close to hide DRAM's latency (M = 1 streamed 13 -> 21 GB/s) */
                _mm_prefetch((const char *)(group_pairs + (rows[0] + block) * 2), _MM_HINT_T0);
                _mm_prefetch((const char *)(group_pairs + (rows[2] + block) * 2), _MM_HINT_T0);
                for (int64_t m = 0; m < mr; m++) {
                    const int8_t *xm = xq + (m0 + m) * K, *xrm = xr + (m0 + m) * K;
                    __m256i sum[4];
                    if (mr == 1)  /* a decode: the registers' unpacking costs less than L1's round trip */
                        products(wc, half, low, high, 1, xm, xrm, g * G, G, sum);
                    else
                        products(wc, half, low, high, 0, xm, xrm, g * G, G, sum);
                    const int64_t gi = (m0 + m) * (K / G) + g;
                    const __m256 d = _mm256_set1_ps(xd[gi]), s = _mm256_set1_ps(xs[gi]);
                    for (int i = 0; i < 4; i++)
                        out[m][i] = group_sum(sum[i], group_pairs + rows[i] * 2, d, s, out[m][i]);
                }
            }
            for (int64_t m = 0; m < mr; m++)
                for (int i = 0; i < 4; i++)
                    _mm256_storeu_ps(y + (m0 + m) * N + rows[i], out[m][i]);
        }
    }
}
/* 8 int32 sums of w * (254 * coarse + fine) over 32 columns: signed w times signed x as maddubs
   wants them, |w| times x with w's sign */
static inline __m256i dot32_i8(__m256i w, __m256i xc, __m256i xf)
{
    const __m256i aw = _mm256_sign_epi8(w, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)  /* the same 4-byte sums in one instruction */
    const __m256i c = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xc, w));
    const __m256i f = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xf, w));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i c = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xc, w)), ones);
    const __m256i f = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xf, w)), ones);
#endif
    return _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(c, 8), _mm256_slli_epi32(c, 1)), f);
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y [M, N] = x [M, K] W^T, W int8 [N, K] with scales [N, K / G] float, w = q * scale. G: a multiple
   of 32; scratch as for int4_matmul. */
void int8_matmul(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                 int64_t G, float *y, void *scratch)
{
    int8_t *xq = scratch, *xr = xq + M * K;
    float *xd = (float *)(xr + M * K), *xs = xd + M * K / G;
    quantize_activations(x, M, K, G, xq, xr, xd, xs);
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g = 0; g < K / G; g++) {
                __m256i isum = _mm256_setzero_si256();
                for (int64_t k = g * G; k < (g + 1) * G; k += 32)
                    isum = _mm256_add_epi32(isum, dot32_i8(_mm256_loadu_si256((const __m256i *)(wn + k)),
                                                           _mm256_loadu_si256((const __m256i *)(xq + m * K + k)),
                                                           _mm256_loadu_si256((const __m256i *)(xr + m * K + k))));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(scales[n * (K / G) + g] * xd[m * K / G + g]), acc);
            }
            y[m * N + n] = hsum(acc);
        }
    }
}
#else
int64_t qmatmul_available(void) { return 0; }  /* callers keep PyTorch's kernels */

void int4_matmul(const float *x, int64_t M, const uint8_t *w, const uint16_t *scales, int64_t N, int64_t K,
                 int64_t G, int64_t block, float *y, void *scratch) {}

void int8_matmul(const float *x, int64_t M, const int8_t *w, const float *scales, int64_t N, int64_t K,
                 int64_t G, float *y, void *scratch) {}
#endif
