/* Random sampling on the CPU: one token per row from softmax(logits / T) truncated by top-k, top-p
   and min-p, drawn by inverse CDF from one given uniform per row. Two passes over the vocabulary
   for plain temperature (max; exp + block sums), then the draw reads the blocks' sums and one block.
   Truncation needs no sort: every option keeps the tokens whose weight w = exp(x - max) is at or
   above a threshold, found by selection over the weights (ties at a threshold are all kept).
   Twin: engine/sampler.py (truncated + inverse_cdf). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "exp_neg.h"

#define BLOCK 64  /* weights per block sum: the draw skips whole blocks */
#define LEVELS 8  /* levels a bracketing pass tests */

/* exp_neg, and exactly 0 below -87 (a masked token's -inf included): a weight never drawn */
static inline float weight_of(float x)
{
    return x > -87.0f ? exp_neg(x) : 0.0f;
}

int64_t sampling_threads(void)
{
    return omp_get_max_threads();
}

/* Weight of the values >= each level (and >= lo) in one vectorized pass: levels bracket a threshold,
   so that each pass keeps only the values between two of them. */
static void level_sums(const float *w, int64_t n, const float level[LEVELS], float lo, int by_count,
                       float acc[LEVELS])
{
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    const float l0 = level[0], l1 = level[1], l2 = level[2], l3 = level[3], l4 = level[4], l5 = level[5],
                l6 = level[6], l7 = level[7];
    const float one = by_count ? 1.0f : 0.0f, self = 1.0f - one;  /* arithmetic, not a branch: it vectorizes */
    #pragma omp simd reduction(+:a0, a1, a2, a3, a4, a5, a6, a7)
    for (int64_t i = 0; i < n; i++) {
        const float v = w[i], f = v >= lo ? one + self * v : 0.0f;
        a0 += v >= l0 ? f : 0.0f;
        a1 += v >= l1 ? f : 0.0f;
        a2 += v >= l2 ? f : 0.0f;
        a3 += v >= l3 ? f : 0.0f;
        a4 += v >= l4 ? f : 0.0f;
        a5 += v >= l5 ? f : 0.0f;
        a6 += v >= l6 ? f : 0.0f;
        a7 += v >= l7 ? f : 0.0f;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

/* w[i] in [bottom, top) to out, in order; chunks with none are skipped by a vectorized count */
static int64_t compact(const float *w, int64_t n, float bottom, float top, float *out)
{
    int64_t m = 0;
    for (int64_t c = 0; c < n; c += BLOCK) {
        const int64_t end = c + BLOCK < n ? c + BLOCK : n;
        int any = 0;
        #pragma omp simd reduction(|:any)
        for (int64_t i = c; i < end; i++)
            any |= w[i] >= bottom && w[i] < top;
        if (!any)
            continue;
        for (int64_t i = c; i < end; i++) {
            out[m] = w[i];
            m += w[i] >= bottom && w[i] < top;
        }
    }
    return m;
}

/* The largest value t of w[0..n) at or above lo such that the weight of the values >= t reaches
   need (weight: 1 a value for top-k, the value itself for top-p); lo where none does.
   a, b: scratch of n floats each. Weights w are in [0, 1]. */
static float threshold(const float *w, int64_t n, float lo, double need, int by_count, float *a, float *b)
{
    /* first fixed levels (a softmax's weights spread over orders of magnitude), then 8 even steps of
       the bracket, while many values are left */
    static const float FIXED[LEVELS] = {0.5f, 0.25f, 0x1p-4f, 0x1p-6f, 0x1p-8f, 0x1p-11f, 0x1p-14f, 0x1p-18f};
    float level[LEVELS], acc[LEVELS], top = 2.0f, bottom = lo;  /* the answer is in [bottom, top) */
    double above = 0;  /* weight of the values >= top */
    const float *in = w;
    float *out = a, *spare = b;
    int64_t m = n;
    for (int round = 0; round < 4 && m > 256; round++) {
        for (int j = 0; j < LEVELS; j++)
            level[j] = round == 0 ? FIXED[j] : bottom + (top - bottom) * (float)(LEVELS - j) / (LEVELS + 1);
        level_sums(in, m, level, bottom, by_count, acc);
        double add = 0;
        float new_top = top;
        for (int j = 0; j < LEVELS && level[j] > bottom && level[j] < top; j++) {
            if (above + acc[j] >= need) {
                bottom = level[j];
                break;
            }
            add = acc[j], new_top = level[j];
        }
        above += add, top = new_top;
        m = compact(in, m, bottom, top, out);
        in = out, out = spare, spare = (float *)in;
    }
    if (in == w)
        in = out, m = compact(w, n, bottom, top, out), out = spare;
    /* weighted quickselect: keep the side of a 3-way split that holds the answer */
    float *cur = (float *)in;
    while (m > 0) {
        const float x = cur[0], y = cur[m / 2], z = cur[m - 1];
        const float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        double greater = 0, equal = 0;
        int64_t g = 0, l = m - 1;  /* > pivot to out[0..g), < pivot to out(l..m) */
        for (int64_t i = 0; i < m; i++) {
            const float v = cur[i], f = by_count ? 1.0f : v;
            out[g] = v;
            out[l] = v;
            g += v > pivot;
            l -= v < pivot;
            greater += v > pivot ? f : 0.0f;
            equal += v == pivot ? f : 0.0f;
        }
        if (above + greater >= need) {
            m = g;
        } else if (above + greater + equal >= need) {
            return pivot;
        } else {
            above += greater + equal;
            m = m - l - 1;
            memmove(out, out + l + 1, m * sizeof(float));
        }
        float *const t = cur;
        cur = out, out = t;
    }
    return bottom;
}

static float mass_at_least(const float *w, int64_t n, float t)
{
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++)
        s += w[i] >= t ? w[i] : 0.0f;
    return s;
}

/* One row: returns the token. w: n weights' scratch, sums: a block sum each, a and b: selection scratch. */
static int64_t sample_row(const float *x, int64_t n, float temperature, int64_t top_k, float top_p, float min_p,
                          float u, float *w, float *sums, float *a, float *b)
{
    float best = -INFINITY;
    #pragma omp simd reduction(max:best)
    for (int64_t i = 0; i < n; i++)
        best = x[i] > best ? x[i] : best;
    if (best == -INFINITY)
        return 0;  /* every token masked: the argmax of such a row */
    /* x / T as x * (1 / T): a product, not a division, per token; either keeps the order (and ties) */
    const float inv = 1.0f / temperature, top = best * inv;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    for (int64_t k = 0; k < blocks; k++) {
        const int64_t end = (k + 1) * BLOCK < n ? (k + 1) * BLOCK : n;
        float s = 0;
        #pragma omp simd reduction(+:s)
        for (int64_t i = k * BLOCK; i < end; i++)
            s += w[i] = weight_of(x[i] * inv - top);
        sums[k] = s;
    }
    /* the row's maximum has w = 1: every threshold is <= 1, so the row keeps at least that token */
    float cut = min_p;
    if (top_k > 0 && top_k < n) {
        const float kth = threshold(w, n, 0.0f, (double)top_k, 1, a, b);
        cut = kth > cut ? kth : cut;
        if (top_p < 1) {
            const float p = threshold(w, n, kth, (double)top_p * mass_at_least(w, n, kth), 0, a, b);
            cut = p > cut ? p : cut;
        }
    } else if (top_p < 1) {
        double total = 0;
        for (int64_t k = 0; k < blocks; k++)
            total += sums[k];
        const float p = threshold(w, n, 0.0f, (double)top_p * total, 0, a, b);
        cut = p > cut ? p : cut;
    }
    if (cut > 0)
        for (int64_t k = 0; k < blocks; k++) {
            const int64_t end = (k + 1) * BLOCK < n ? (k + 1) * BLOCK : n;
            float s = 0;
            #pragma omp simd reduction(+:s)
            for (int64_t i = k * BLOCK; i < end; i++)
                s += w[i] >= cut ? w[i] : 0.0f;
            sums[k] = s;
        }
    double total = 0;
    for (int64_t k = 0; k < blocks; k++)
        total += sums[k];
    /* the first token whose cumulative weight exceeds u * total: a token of weight 0 never is one */
    const double target = (double)u * total;
    double cum = 0;
    for (int64_t k = 0; k < blocks; k++) {
        if (cum + sums[k] <= target) {
            cum += sums[k];
            continue;
        }
        const int64_t end = (k + 1) * BLOCK < n ? (k + 1) * BLOCK : n;
        for (int64_t i = k * BLOCK; i < end; i++) {
            const float v = w[i] >= cut ? w[i] : 0.0f;
            cum += v;
            if (v > 0 && cum > target)
                return i;
        }
    }
    for (int64_t i = n - 1; i > 0; i--)  /* rounding left u * total at the end: the last kept token */
        if (w[i] > 0 && w[i] >= cut)
            return i;
    return 0;
}

/* For j < rows: out[j] = a token of logits row index[j] (j when index is NULL; stride floats apart,
   n tokens), with params[4 j ..] = temperature, top_k (<= 0: off), top_p, min_p, and uniform u[j] in
   [0, 1). work: per thread (sampling_threads()), work_stride floats >= 3 n + n / 64 + 1. */
void sample_rows(const float *logits, int64_t stride, const int64_t *index, int64_t rows, int64_t n,
                 const double *params, const float *u, float *work, int64_t work_stride, int64_t *out)
{
    /* threads only for work worth ~0.2 ms: a team's start and a busy core cost more below it */
    #pragma omp parallel for schedule(dynamic) if (rows * n >= (1 << 18))
    for (int64_t j = 0; j < rows; j++) {
        float *w = work + omp_get_thread_num() * work_stride;
        const double *p = params + 4 * j;
        out[j] = sample_row(logits + (index ? index[j] : j) * stride, n, (float)p[0], (int64_t)p[1],
                            (float)p[2], (float)p[3], u[j], w, w + n, w + n + (n + BLOCK - 1) / BLOCK,
                            w + 2 * n + (n + BLOCK - 1) / BLOCK);
    }
}
