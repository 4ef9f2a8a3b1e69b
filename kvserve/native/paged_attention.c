/* Decode attention over the paged KV cache in place: one query token per sequence, its K/V read
   from its pages where they lie. PyTorch can only gather each sequence's pages into a copy first
   (TorchRefAttention._decode), which at batch 64 moves more bytes than the attention reads.
   Twin: TorchRefAttention._decode. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_neg.h"
#include "kv_element.h"

#ifdef __AVX2__
#include <immintrin.h>

/* elements i..i+7 of a cache as floats */
static inline __m256 kv_load8(const void *base, int64_t i, int bf16)
{
    if (!bf16)
        return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* ((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7)): the scalar dot product's order before it was
   vectorized (decode's keys past the last whole 8 use it; whole 8s go through sum8x8) */
static inline float sum8(__m256 v)
{
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pairs = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs));
}
#endif

/* q . k[row..row+D) (GCC leaves these loops scalar unless written out with intrinsics) */
static inline float dot_kv(const float *q, const void *k, int64_t row, int64_t D, int bf16)
{
    int64_t d = 0;
    float total = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv_load8(k, row + d, bf16), acc);
    total = sum8(acc);
#endif
    for (; d < D; d++)
        total += q[d] * kv_load(k, row + d, bf16);
    return total;
}

/* o += w * v[row..row+D) */
static inline void axpy_kv(float *o, float w, const void *v, int64_t row, int64_t D, int bf16)
{
    int64_t d = 0;
#ifdef __AVX2__
    for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(_mm256_set1_ps(w), kv_load8(v, row + d, bf16), _mm256_loadu_ps(o + d)));
#endif
    for (; d < D; d++)
        o[d] += w * kv_load(v, row + d, bf16);
}

/* s[0..n) -> its softmax, in place (GCC leaves the max and the sum scalar: a float reduction);
   returns log(sum(exp(s))) of the scores given */
static inline float softmax(float *s, int64_t n)
{
    float best = -INFINITY, total = 0;
    int64_t t = 0;
#ifdef __AVX2__
    __m256 top = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8)
        top = _mm256_max_ps(top, _mm256_loadu_ps(s + t));
    __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
    best = _mm_cvtss_f32(_mm_max_ss(top4, _mm_shuffle_ps(top4, top4, 1)));
#endif
    for (; t < n; t++)
        best = s[t] > best ? s[t] : best;
    for (t = 0; t < n; t++)
        s[t] = exp_neg(s[t] - best);
    t = 0;
#ifdef __AVX2__
    for (; t + 8 <= n; t += 8)
        sum = _mm256_add_ps(sum, _mm256_loadu_ps(s + t));
    total = sum8(sum);
#endif
    for (; t < n; t++)
        total += s[t];
    const float inverse = 1 / total;
    for (t = 0; t < n; t++)
        s[t] *= inverse;
    return best + logf(total);
}

/* elements i..i+n of a cache into the CPU's caches */
static inline void prefetch_rows(const void *cache, int64_t i, int64_t n, int bf16)
{
    const int64_t size = bf16 ? 2 : 4;
    const char *start = (const char *)cache + i * size;
    for (int64_t offset = 0; offset < n * size; offset += 64)
        __builtin_prefetch(start + offset);
}

/* s[0..n) <- softcap * tanh(s / softcap): Gemma 2's bound on the logits */
static inline void cap_scores(float *s, int64_t n, float softcap)
{
    for (int64_t t = 0; t < n; t++)
        s[t] = softcap * tanhf(s[t] / softcap);
}

#ifdef __AVX2__
/* [sum(a[0]), ..., sum(a[7])]: eight dot products' accumulators reduced at once */
static inline __m256 sum8x8(const __m256 a[8])
{
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* s[0..8) = scale * (q . rows first, first + D, ... first + 7 D) of a cache */
static inline __attribute__((always_inline)) void dot8_kv(const float *q, const void *k, int64_t first, int64_t D,
                                                         int bf16, float scale, float *s)
{
    __m256 acc[8];
    for (int j = 0; j < 8; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_fmadd_ps(qv, kv_load8(k, first + j * D + d, bf16), acc[j]);
    }
    _mm256_storeu_ps(s, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale)));
}

/* out[0..64) += sum_r w[r] * v rows first + r D, r < rows (out's 64 floats kept in registers) */
static inline __attribute__((always_inline)) void axpy64_kv(float *out, const float *w, const void *v, int64_t first,
                                                           int64_t rows, int64_t D, int bf16)
{
    __m256 o[8];
    for (int c = 0; c < 8; c++)
        o[c] = _mm256_loadu_ps(out + c * 8);
    for (int64_t r = 0; r < rows; r++) {
        const __m256 p = _mm256_set1_ps(w[r]);
        for (int c = 0; c < 8; c++)
            o[c] = _mm256_fmadd_ps(p, kv_load8(v, first + r * D + c * 8, bf16), o[c]);
    }
    for (int c = 0; c < 8; c++)
        _mm256_storeu_ps(out + c * 8, o[c]);
}
#endif

/* The query heads of KV head g of sequence b: q [group, D] over positions lo..n-1 of its pages, and
   0..sink-1 before them (StreamingLLM's attention sinks; none when sink <= 0 or lo == 0). Pages of
   neither range are not touched: a sliding window or streaming may have given them back; out
   [group, D], and each head's log-sum-exp of its scores in lse [group] unless NULL. scores:
   group * (sink + n - lo) floats. softcap > 0 caps the scaled scores. Inlined
   into one copy per cache dtype. Eight keys' dot products at a time, reduced together, and a page's
   V rows summed into each head's output in registers. */
static inline __attribute__((always_inline)) void attend_kv_head_as(
    const float *q, const void *k_cache, const void *v_cache, const int bf16, int64_t S, int64_t g,
    int64_t group, int64_t D, float scale, float softcap, const int32_t *pages, int64_t page_size, int64_t sink,
    int64_t lo, int64_t n, float *scores, float *out, float *lse)
{
    const int64_t sinks = sink <= 0 ? 0 : sink < lo ? sink : lo, base = g * S * D, m = sinks + n - lo;
    /* the ranges read, [0, sinks) then [lo, n), their scores one after the other */
    const int64_t from[2] = {0, lo}, to[2] = {sinks, n}, at[2] = {0, sinks - lo};
    for (int part = 0; part < 2; part++)
        for (int64_t t0 = from[part], end = to[part]; t0 < end;) {
            const int64_t p = t0 / page_size, skip = t0 % page_size;
            const int64_t first = base + ((int64_t)pages[p] * page_size + skip) * D;
            const int64_t rows = end - t0 < page_size - skip ? end - t0 : page_size - skip;
            float *row_scores = scores + t0 + at[part];
            /* pages lie apart, where the hardware prefetcher stops: the next K page is fetched while
               this one's scores are computed (V is read after the softmax, past what the caches hold) */
            if (t0 + rows < end)
                prefetch_rows(k_cache, base + (int64_t)pages[p + 1] * page_size * D, page_size * D, bf16);
            int64_t r = 0;
#ifdef __AVX2__
            if (D % 8 == 0)
                for (; r + 8 <= rows; r += 8)
                    for (int64_t h = 0; h < group; h++)
                        dot8_kv(q + h * D, k_cache, first + r * D, D, bf16, scale, row_scores + h * m + r);
#endif
            for (; r < rows; r++)
                for (int64_t h = 0; h < group; h++)
                    row_scores[h * m + r] = dot_kv(q + h * D, k_cache, first + r * D, D, bf16) * scale;
            t0 += rows;
        }
    for (int64_t h = 0; h < group; h++) {
        if (softcap > 0)
            cap_scores(scores + h * m, m, softcap);
        const float sum = softmax(scores + h * m, m);
        if (lse)
            lse[h] = sum;
    }
    memset(out, 0, group * D * sizeof *out);
    for (int part = 0; part < 2; part++)
        for (int64_t t0 = from[part], end = to[part]; t0 < end;) {
            const int64_t p = t0 / page_size, skip = t0 % page_size;
            const int64_t first = base + ((int64_t)pages[p] * page_size + skip) * D;
            const int64_t rows = end - t0 < page_size - skip ? end - t0 : page_size - skip;
            const float *row_scores = scores + t0 + at[part];
            if (t0 + rows < end)
                prefetch_rows(v_cache, base + (int64_t)pages[p + 1] * page_size * D, page_size * D, bf16);
#ifdef __AVX2__
            if (D % 64 == 0) {
                for (int64_t h = 0; h < group; h++)
                    for (int64_t d0 = 0; d0 < D; d0 += 64)
                        axpy64_kv(out + h * D + d0, row_scores + h * m, v_cache, first + d0, rows, D, bf16);
                t0 += rows;
                continue;
            }
#endif
            for (int64_t r = 0; r < rows; r++)
                for (int64_t h = 0; h < group; h++)
                    axpy_kv(out + h * D, row_scores[h * m + r], v_cache, first + r * D, D, bf16);
            t0 += rows;
        }
}

/* First position a query at position n - 1 reads under a sliding window of `window` keys (<= 0:
   none, the whole sequence) */
static inline int64_t window_start(int64_t n, int64_t window)
{
    return window > 0 && n > window ? n - window : 0;
}

/* attend_kv_head_as with its scores allocated here; returns 0, or -1 when out of memory */
static int64_t attend_kv_head(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t S,
                              int64_t g, int64_t group, int64_t D, float scale, float softcap, const int32_t *pages,
                              int64_t page_size, int64_t sink, int64_t lo, int64_t n, float *out, float *lse)
{
    float *scores = malloc(group * ((sink > 0 ? sink : 0) + n - lo) * sizeof *scores);
    if (!scores)
        return -1;
    if (bf16)
        attend_kv_head_as(q, k_cache, v_cache, 1, S, g, group, D, scale, softcap, pages, page_size, sink, lo, n, scores,
                          out, lse);
    else
        attend_kv_head_as(q, k_cache, v_cache, 0, S, g, group, D, scale, softcap, pages, page_size, sink, lo, n, scores,
                          out, lse);
    free(scores);
    return 0;
}

/* A decode's keys are attended in pieces of this many, whose outputs merge by their log-sum-exp
   (flash-decoding, vLLM's partition size): one long sequence's few KV heads then keep every thread
   busy (SmolLM2's 3 on 2 threads left one idle a third of the time). A fixed size, not one from the
   batch or the threads, so that a sequence's output does not depend on either. */
#define PIECE_KEYS 512

/* The query heads q [group, D] of KV head g of one decode over its keys [lo, n), and the sinks
   [0, min(sink, lo)), of the page table `pages` -> out [group, D]: attend_kv_head_as's arguments */
typedef struct {
    const float *q;
    const int32_t *pages;
    int64_t g, sink, lo, n;
    float *out;
} HeadTask;

static inline int64_t pieces_of(const HeadTask *t)
{
    return (t->n - t->lo + PIECE_KEYS - 1) / PIECE_KEYS;
}

/* out [group, D] <- the pieces' outputs parts [P, group, D] weighted by their share of the softmax's
   sum, from their log-sum-exps lse [P, group] */
static void merge_pieces(const float *parts, const float *lse, int64_t P, int64_t group, int64_t D, float *out)
{
    for (int64_t h = 0; h < group; h++) {
        float top = -INFINITY, total = 0;
        for (int64_t p = 0; p < P; p++)
            top = lse[p * group + h] > top ? lse[p * group + h] : top;
        memset(out + h * D, 0, D * sizeof *out);
        for (int64_t p = 0; p < P; p++) {
            const float w = expf(lse[p * group + h] - top);
            total += w;
            for (int64_t d = 0; d < D; d++)
                out[h * D + d] += w * parts[(p * group + h) * D + d];
        }
        for (int64_t d = 0; d < D; d++)
            out[h * D + d] /= total;
    }
}

/* tasks[0..count) over the threads, a piece of PIECE_KEYS keys a parallel task; a task of one
   piece writes its output directly. Returns 0, or -1 when out of memory. */
static int64_t attend_heads(const HeadTask *tasks, int64_t count, const void *k_cache, const void *v_cache, int bf16,
                            int64_t S, int64_t group, int64_t D, float scale, float softcap, int64_t page_size)
{
    if (count == 0)
        return 0;
    /* first[i]: task i's first piece; at[i]: its first slot in parts (tasks of several pieces) */
    int64_t *first = malloc(sizeof(int64_t) * (2 * count + 1)), *at = first + count + 1, pieces = 0, slots = 0;
    if (!first)
        return -1;
    for (int64_t i = 0; i < count; i++) {
        const int64_t n = pieces_of(tasks + i);
        first[i] = pieces;
        at[i] = slots;
        pieces += n;
        slots += n > 1 ? n : 0;
    }
    first[count] = pieces;
    int64_t *owner = malloc(sizeof(int64_t) * pieces), failed = 0;
    float *parts = slots ? malloc(sizeof(float) * slots * group * (D + 1)) : NULL;
    float *lse = parts ? parts + slots * group * D : NULL;
    if (!owner || (slots && !parts)) {
        free(first);
        free(owner);
        free(parts);
        return -1;
    }
    for (int64_t i = 0; i < count; i++)
        for (int64_t p = first[i]; p < first[i + 1]; p++)
            owner[p] = i;
    #pragma omp parallel
    {
        #pragma omp for schedule(dynamic)
        for (int64_t p = 0; p < pieces; p++) {
            const int64_t i = owner[p], piece = p - first[i], whole = first[i + 1] - first[i] == 1;
            const HeadTask *t = tasks + i;
            const int64_t lo = t->lo + piece * PIECE_KEYS, n = t->n < lo + PIECE_KEYS ? t->n : lo + PIECE_KEYS;
            const int64_t slot = at[i] + piece;
            if (attend_kv_head(t->q, k_cache, v_cache, bf16, S, t->g, group, D, scale, softcap, t->pages, page_size,
                               piece == 0 ? t->sink : 0, lo, n, whole ? t->out : parts + slot * group * D,
                               whole ? NULL : lse + slot * group))
                failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < count; i++)
            if (first[i + 1] - first[i] > 1 && !failed)
                merge_pieces(parts + at[i] * group * D, lse + at[i] * group, first[i + 1] - first[i], group, D,
                             tasks[i].out);
    }
    free(first);
    free(owner);
    free(parts);
    return failed ? -1 : 0;
}

/* q [B, H, D] -> out [B, H, D]: sequence b attends positions 0..kv_lens[b]-1 (its last `window` of
   them when window > 0), held in pages page_table[page_starts[b]...] of the caches [Hkv, S, D]
   (float32, or bfloat16 when bf16); softcap > 0 caps the scaled scores at +-softcap (tanh).
   Returns 0, or -1 when out of memory. */
int64_t paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, int64_t bf16, int64_t S,
                               int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, float softcap,
                               int64_t window, const int32_t *page_table, const int64_t *page_starts,
                               const int64_t *kv_lens, int64_t page_size, float *out, int64_t sink)
{
    const int64_t group = H / Hkv;
    HeadTask *tasks = malloc(sizeof(HeadTask) * (B * Hkv + 1));
    if (!tasks)
        return -1;
    for (int64_t task = 0; task < B * Hkv; task++) {
        const int64_t b = task / Hkv, g = task % Hkv;
        tasks[task] = (HeadTask){q + (b * H + g * group) * D, page_table + page_starts[b], g, sink,
                                 window_start(kv_lens[b], window), kv_lens[b], out + (b * H + g * group) * D};
    }
    const int64_t failed = attend_heads(tasks, B * Hkv, k_cache, v_cache, (int)bf16, S, group, D, scale, softcap,
                                        page_size);
    free(tasks);
    return failed;
}

/* The k-th largest (k counted from 0) of x[0..n); reorders x (quickselect) */
static float kth_largest(float *x, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot)
                i++;
            while (x[j] < pivot)
                j--;
            if (i <= j) {
                const float t = x[i];
                x[i++] = x[j];
                x[j--] = t;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return x[k];
    }
    return x[k];
}

/* The k-th largest (from 0) of s[0..m), k < m: a histogram over the range of s finds the bucket
   that holds it, quickselect finishes among that bucket's values (pick: room for m floats). Two
   streaming passes instead of quickselect's unpredictable branches over every value. */
static float kth_largest_scores(const float *s, int64_t m, int64_t k, float *pick)
{
    enum { BUCKETS = 2048 };
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t t = 0; t < m; t++) {
        lo = s[t] < lo ? s[t] : lo;
        hi = s[t] > hi ? s[t] : hi;
    }
    if (!(hi > lo))  /* all equal (or not finite): nothing to bucket */
        return hi;
    const float width = BUCKETS / (hi - lo);
    int32_t count[BUCKETS] = {0};
    for (int64_t t = 0; t < m; t++) {
        const int64_t b = (int64_t)((s[t] - lo) * width);
        count[b < BUCKETS ? b : BUCKETS - 1]++;
    }
    int64_t above = 0, b = BUCKETS - 1;
    while (above + count[b] <= k)
        above += count[b--];
    int64_t n = 0;
    for (int64_t t = 0; t < m; t++) {
        const int64_t tb = (int64_t)((s[t] - lo) * width);
        if ((tb < BUCKETS ? tb : BUCKETS - 1) == b)
            pick[n++] = s[t];
    }
    return kth_largest(pick, n, k - above);
}

/* scores[h * n + t] = scale * q_h . key t, for the group query heads q [group, D] of KV head g over
   positions [0, n) of its pages (eight keys at a time where D allows, as attend_kv_head_as) */
static void score_kv_head(const float *q, const void *k_cache, int bf16, int64_t S, int64_t g, int64_t group,
                          int64_t D, float scale, const int32_t *pages, int64_t page_size, int64_t n, float *scores)
{
    const int64_t base = g * S * D;
    for (int64_t t0 = 0; t0 < n;) {
        const int64_t first = base + (int64_t)pages[t0 / page_size] * page_size * D;
        const int64_t rows = n - t0 < page_size ? n - t0 : page_size;
        int64_t r = 0;
#ifdef __AVX2__
        if (D % 8 == 0)
            for (; r + 8 <= rows; r += 8)
                for (int64_t h = 0; h < group; h++)
                    dot8_kv(q + h * D, k_cache, first + r * D, D, bf16, scale, scores + h * n + t0 + r);
#endif
        for (; r < rows; r++)
            for (int64_t h = 0; h < group; h++)
                scores[h * n + t0 + r] = dot_kv(q + h * D, k_cache, first + r * D, D, bf16) * scale;
        t0 += rows;
    }
}

/* Exact top-k decode of one sequence (the topk policy): query head h of q [H, D] attends positions
   [0, start) and [end, n) of its pages, and the k highest-scoring positions of [start, end) (ties
   at the k-th score taken in position order), in one softmax; out [H, D]. Caches [Hkv, S, D] as in
   paged_decode_attention. Every key is scored, but only the kept rows of V are read. Returns 0, or
   -1 when out of memory. */
int64_t topk_decode_attention(const float *q, const void *k_cache, const void *v_cache, int64_t bf16, int64_t S,
                              int64_t H, int64_t Hkv, int64_t D, float scale, float softcap, const int32_t *pages,
                              int64_t page_size, int64_t n, int64_t start, int64_t end, int64_t k, float *out)
{
    const int64_t group = H / Hkv, m = end - start, keep = k < m ? k : m;
    int64_t failed = 0;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t g = 0; g < Hkv; g++) {
        float *scores = malloc(group * n * sizeof *scores), *pick = malloc((m > 0 ? m : 1) * sizeof *pick);
        int64_t *kept_pos = malloc(n * sizeof *kept_pos);
        if (!scores || !pick || !kept_pos) {
            failed = 1;
            free(scores);
            free(pick);
            free(kept_pos);
            continue;
        }
        score_kv_head(q + g * group * D, k_cache, (int)bf16, S, g, group, D, scale, pages, page_size, n, scores);
        for (int64_t h = 0; h < group; h++) {
            float *s = scores + h * n;
            if (softcap > 0)
                cap_scores(s, n, softcap);
            float floor = -INFINITY;
            int64_t ties = 0;  /* how many keys scoring exactly the k-th score are kept */
            if (keep < m && keep > 0) {
                floor = kth_largest_scores(s + start, m, keep - 1, pick);
                ties = keep;
                for (int64_t t = start; t < end; t++)
                    ties -= s[t] > floor;
            }
            int64_t kept = 0;
            for (int64_t t = 0; t < n; t++) {  /* compact the kept keys' scores and positions */
                const int sampled = t >= start && t < end;
                if (sampled && keep < m && !(s[t] > floor || (s[t] == floor && ties-- > 0)))
                    continue;
                s[kept] = s[t];
                kept_pos[kept++] = t;
            }
            softmax(s, kept);  /* its log-sum-exp unused */
            float *o = out + (g * group + h) * D;
            memset(o, 0, D * sizeof *o);
            for (int64_t r = 0; r < kept; r++) {
                const int64_t t = kept_pos[r];
                axpy_kv(o, s[r], v_cache, (g * S + (int64_t)pages[t / page_size] * page_size + t % page_size) * D, D,
                        (int)bf16);
            }
        }
        free(scores);
        free(pick);
        free(kept_pos);
    }
    return failed ? -1 : 0;
}
