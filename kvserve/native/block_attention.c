/* Attention of a block of consecutive query tokens of one sequence (a prompt chunk, a verification's
   k + 1 rows) over its paged K/V, for decode.c, which includes it after gemm.c and paged_attention.c.
   Flash-style, 16 keys at a time: the scores of those keys for a panel of 16 query heads (the block's
   heads of one KV head) are S = K Q^T, each key's row broadcast against the transposed queries, so K
   is read where it lies and never transposed; an online softmax runs down the key axis (the panel's
   16 heads are the vector lanes: maxima and sums are vertical); out += P V reads V's rows in place.
   Each key is read once per block, and nothing larger than a tile is written. */
#ifdef __AVX2__
#define KEYS 16  /* keys a tile */
#define QCOLS 16 /* query heads a panel: two vectors */
#define FLOOR -3.0e38f /* the running maximum before any key: finite, so that masked terms give 0, not NaN */

/* exp_neg on 8 lanes */
static inline __m256 exp_neg8(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* s[j, 0..15] = keys[j] . qt[:, 0..15] for `rows` (1..MR) keys: accumulators in registers when
   `rows` is a constant, which qk's switch makes it */
static inline __attribute__((always_inline)) void qk_tile(const float *const *keys, const float *qt, int64_t D,
                                                         float *s, int rows)
{
    __m256 acc[MR][2];
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m256 b0 = _mm256_loadu_ps(qt + d * QCOLS), b1 = _mm256_loadu_ps(qt + d * QCOLS + 8);
        for (int r = 0; r < rows; r++) {
            const __m256 a = _mm256_broadcast_ss(keys[r] + d);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(s + r * QCOLS, acc[r][0]);
        _mm256_storeu_ps(s + r * QCOLS + 8, acc[r][1]);
    }
}

/* s [count, QCOLS]: the scores of keys[0..count) */
static void qk(const float *const *keys, int64_t count, const float *qt, int64_t D, float *s)
{
    for (int64_t j = 0; j < count; j += MR) {
        switch (count - j < MR ? count - j : MR) {
        case 1: qk_tile(keys + j, qt, D, s + j * QCOLS, 1); break;
        case 2: qk_tile(keys + j, qt, D, s + j * QCOLS, 2); break;
        case 3: qk_tile(keys + j, qt, D, s + j * QCOLS, 3); break;
        case 4: qk_tile(keys + j, qt, D, s + j * QCOLS, 4); break;
        case 5: qk_tile(keys + j, qt, D, s + j * QCOLS, 5); break;
        default: qk_tile(keys + j, qt, D, s + j * QCOLS, MR); break;
        }
    }
}

/* o[c, d0..d0+15] = o[c, ..] * alpha[c] + sum_j p[j, c] vals[j][d0..d0+15] for heads c < cols (1..MR) */
static inline __attribute__((always_inline)) void pv_tile(const float *p, const float *const *vals, int64_t count,
                                                         int64_t d0, const float *alpha, float *o, int64_t D,
                                                         int cols)
{
    __m256 acc[MR][2];
    for (int c = 0; c < cols; c++)
        acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; j++) {
        const __m256 b0 = _mm256_loadu_ps(vals[j] + d0), b1 = _mm256_loadu_ps(vals[j] + d0 + 8);
        for (int c = 0; c < cols; c++) {
            const __m256 a = _mm256_broadcast_ss(p + j * QCOLS + c);
            acc[c][0] = _mm256_fmadd_ps(a, b0, acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(a, b1, acc[c][1]);
        }
    }
    for (int c = 0; c < cols; c++) {
        const __m256 scale = _mm256_set1_ps(alpha[c]);
        float *y = o + c * D + d0;
        _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_loadu_ps(y), scale, acc[c][0]));
        _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(_mm256_loadu_ps(y + 8), scale, acc[c][1]));
    }
}

/* the panel's heads 0..cols-1: o = o * alpha + p V */
static void pv(const float *p, const float *const *vals, int64_t count, const float *alpha, float *o, int64_t D,
               int64_t cols)
{
    for (int64_t c = 0; c < cols; c += MR)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            switch (cols - c < MR ? cols - c : MR) {
            case 1: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, 1); break;
            case 2: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, 2); break;
            case 3: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, 3); break;
            case 4: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, 4); break;
            case 5: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, 5); break;
            default: pv_tile(p + c, vals, count, d0, alpha + c, o + c * D, D, MR); break;
            }
        }
}

/* Element offset of key t's row of KV head g in a cache [Hkv, S, D] */
static inline int64_t key_offset(int64_t S, int64_t g, int64_t D, const int32_t *pages, int64_t page_size, int64_t t)
{
    return (g * S + (int64_t)pages[t / page_size] * page_size + t % page_size) * D;
}

/* Rows of one cache's keys c0..c0+count-1 of KV head g: pointers into the cache (float32), or into
   `scratch` [count, D] after converting them (bfloat16) */
static void key_rows(const void *cache, int bf16, int64_t S, int64_t g, int64_t D, const int32_t *pages,
                     int64_t page_size, int64_t c0, int64_t count, float *scratch, const float **rows)
{
    for (int64_t j = 0; j < count; j++) {
        const int64_t row = key_offset(S, g, D, pages, page_size, c0 + j);
        if (!bf16) {
            rows[j] = (const float *)cache + row;
            continue;
        }
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(scratch + j * D + d, kv_load8(cache, row + d, 1));
        rows[j] = scratch + j * D;
    }
}

/* keys c0..c0+count-1 of one cache into the CPU's caches: pages lie apart, where the hardware
   prefetcher stops */
static void prefetch_keys(const void *cache, int bf16, int64_t S, int64_t g, int64_t D, const int32_t *pages,
                          int64_t page_size, int64_t c0, int64_t count)
{
    for (int64_t j = 0; j < count; j++)
        prefetch_rows(cache, key_offset(S, g, D, pages, page_size, c0 + j), D, bf16);
}

/* The online softmax of one tile for one panel: s [count, QCOLS] scores -> probabilities against the
   panel's new running maximum m; l (running sums) and alpha (o's rescaling) updated */
static void tile_softmax(float *s, int64_t count, float *m, float *l, float *alpha)
{
    __m256 top0 = _mm256_loadu_ps(m), top1 = _mm256_loadu_ps(m + 8);
    const __m256 old0 = top0, old1 = top1;
    for (int64_t j = 0; j < count; j++) {
        top0 = _mm256_max_ps(top0, _mm256_loadu_ps(s + j * QCOLS));
        top1 = _mm256_max_ps(top1, _mm256_loadu_ps(s + j * QCOLS + 8));
    }
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; j++) {
        const __m256 p0 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + j * QCOLS), top0));
        const __m256 p1 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + j * QCOLS + 8), top1));
        _mm256_storeu_ps(s + j * QCOLS, p0);
        _mm256_storeu_ps(s + j * QCOLS + 8, p1);
        sum0 = _mm256_add_ps(sum0, p0);
        sum1 = _mm256_add_ps(sum1, p1);
    }
    const __m256 a0 = exp_neg8(_mm256_sub_ps(old0, top0)), a1 = exp_neg8(_mm256_sub_ps(old1, top1));
    _mm256_storeu_ps(alpha, a0);
    _mm256_storeu_ps(alpha + 8, a1);
    _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), a0, sum0));
    _mm256_storeu_ps(l + 8, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8), a1, sum1));
    _mm256_storeu_ps(m, top0);
    _mm256_storeu_ps(m + 8, top1);
}

/* Query rows 0..R-1 (q: row 0's heads of KV head g, rows ldq apart) at positions first..first+R-1
   -> out (row r's heads at out + r * ldo); row r reads keys from window_start(first + r + 1, window)
   on (a sliding window); softcap > 0 caps the scaled scores (tanh). D a multiple of 16. Returns 0, or
   -1 when out of memory. */
static int64_t attend_block(const float *q, int64_t ldq, int64_t R, int64_t first, const void *k_cache,
                            const void *v_cache, int bf16, int64_t S, int64_t g, int64_t group, int64_t D,
                            float scale, float softcap, int64_t window, const int32_t *pages, int64_t page_size,
                            float *out, int64_t ldo)
{
    const int64_t Q = R * group, panels = (Q + QCOLS - 1) / QCOLS, n = first + R;
    const int64_t lo = window_start(first + 1, window), last_lo = window_start(n, window);
    /* per panel: qt [D, QCOLS] (scaled, zero past Q), o [QCOLS, D], m, l; then one tile's s [KEYS,
       QCOLS], alpha, and bf16 rows converted */
    const int64_t per_panel = 2 * D * QCOLS + 2 * QCOLS;
    float *buf = calloc(panels * per_panel + KEYS * QCOLS + QCOLS + (bf16 ? 2 * KEYS * D : 0), sizeof(float));
    if (!buf)
        return -1;
    float *s = buf + panels * per_panel, *alpha = s + KEYS * QCOLS, *kf = alpha + QCOLS, *vf = kf + KEYS * D;
    for (int64_t i = 0; i < Q; i++) {  /* query i: row i / group, head i % group */
        float *qt = buf + i / QCOLS * per_panel;
        for (int64_t d = 0; d < D; d++)
            qt[d * QCOLS + i % QCOLS] = q[i / group * ldq + i % group * D + d] * scale;
    }
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < QCOLS; c++)
            buf[p * per_panel + 2 * D * QCOLS + c] = FLOOR;
    const float *krows[KEYS], *vrows[KEYS];
    for (int64_t c0 = lo; c0 < n; c0 += KEYS) {
        const int64_t count = n - c0 < KEYS ? n - c0 : KEYS;
        prefetch_keys(v_cache, bf16, S, g, D, pages, page_size, c0, count);  /* read after the scores */
        if (c0 + KEYS < n)
            prefetch_keys(k_cache, bf16, S, g, D, pages, page_size, c0 + KEYS, n - c0 - KEYS < KEYS ? n - c0 - KEYS : KEYS);
        key_rows(k_cache, bf16, S, g, D, pages, page_size, c0, count, kf, krows);
        key_rows(v_cache, bf16, S, g, D, pages, page_size, c0, count, vf, vrows);
        /* some row does not see some key of the tile: a later one (causal) or an earlier one (window) */
        const int masked = c0 + count - 1 > first || c0 < last_lo;
        for (int64_t p = 0; p < panels; p++) {
            float *qt = buf + p * per_panel, *o = qt + D * QCOLS, *m = o + D * QCOLS, *l = m + QCOLS;
            const int64_t cols = Q - p * QCOLS < QCOLS ? Q - p * QCOLS : QCOLS;
            qk(krows, count, qt, D, s);
            if (softcap > 0)
                cap_scores(s, count * QCOLS, softcap);
            for (int64_t c = 0; masked && c < cols; c++) {
                const int64_t pos = first + (p * QCOLS + c) / group, from = window_start(pos + 1, window);
                for (int64_t j = 0; j < count; j++)
                    if (c0 + j > pos || c0 + j < from)
                        s[j * QCOLS + c] = -INFINITY;
            }
            tile_softmax(s, count, m, l, alpha);
            pv(s, vrows, count, alpha, o, D, cols);
        }
    }
    for (int64_t i = 0; i < Q; i++) {
        const float *o = buf + i / QCOLS * per_panel + D * QCOLS + i % QCOLS * D;
        const float inverse = 1 / buf[i / QCOLS * per_panel + 2 * D * QCOLS + QCOLS + i % QCOLS];
        for (int64_t d = 0; d < D; d++)
            out[i / group * ldo + i % group * D + d] = o[d] * inverse;
    }
    free(buf);
    return 0;
}
#endif
