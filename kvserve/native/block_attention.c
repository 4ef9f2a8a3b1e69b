/* Attention of a block of consecutive query tokens of one sequence (a prompt chunk) over its paged
   K/V, for decode.c, which includes it after gemm.c and paged_attention.c. Row by row (the decode
   kernel) every query reads every key again; here the block's query heads of one KV head are the
   rows of two small matrix products per 16 keys, scores = Q K^T and out += P V, on gemm.c's FMA
   tiles, so each key is read once per block. */
#ifdef __AVX2__
#define KEYS 16 /* gemm.c's panel width */

#define V_KEYS 64 /* keys per P V product: each of its tiles loads and stores y once per this many */

/* Element offset of key t's row of KV head g in the caches; -1 outside lo..n-1 (before lo, a sliding
   window may have given the page back) */
static inline int64_t key_row(int64_t S, int64_t g, int64_t D, const int32_t *pages, int64_t page_size, int64_t t,
                              int64_t lo, int64_t n)
{
    return t >= lo && t < n ? (g * S + (int64_t)pages[t / page_size] * page_size + t % page_size) * D : -1;
}

/* K of keys c0..c0+15 as floats, transposed to kt [D, 16], 8 keys x 8 dims at a time; zero outside
   lo..n-1. D a multiple of 8. */
static void load_k(const void *k_cache, int bf16, int64_t S, int64_t g, int64_t D, const int32_t *pages,
                   int64_t page_size, int64_t c0, int64_t lo, int64_t n, float *kt)
{
    for (int64_t j0 = 0; j0 < KEYS; j0 += 8) {
        int64_t rows[8];
        for (int64_t i = 0; i < 8; i++)
            rows[i] = key_row(S, g, D, pages, page_size, c0 + j0 + i, lo, n);
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
            __m256 v[8];
            for (int64_t i = 0; i < 8; i++)
                v[i] = rows[i] < 0 ? _mm256_setzero_ps() : kv_load8(k_cache, rows[i] + d0, bf16);
            transpose8(v);
            for (int64_t c = 0; c < 8; c++)
                _mm256_storeu_ps(kt + (d0 + c) * KEYS + j0, v[c]);
        }
    }
}

/* V of keys c0..c0+count-1 as floats, vt [count, D]; zero outside lo..n-1 */
static void load_v(const void *v_cache, int bf16, int64_t S, int64_t g, int64_t D, const int32_t *pages,
                   int64_t page_size, int64_t c0, int64_t count, int64_t lo, int64_t n, float *vt)
{
    for (int64_t j = 0; j < count; j++) {
        const int64_t row = key_row(S, g, D, pages, page_size, c0 + j, lo, n);
        for (int64_t d0 = 0; d0 < D; d0 += 8)
            _mm256_storeu_ps(vt + j * D + d0, row < 0 ? _mm256_setzero_ps() : kv_load8(v_cache, row + d0, bf16));
    }
}

/* Query rows 0..R-1 (q: row 0's heads of KV head g, rows ldq apart) at positions first..first+R-1
   -> out (row r's heads at out + r * ldo); row r reads keys from window_start(first + r + 1, window)
   on (a sliding window). D a multiple of 16. Returns 0, or -1 when out of
   memory. */
static int64_t attend_block(const float *q, int64_t ldq, int64_t R, int64_t first, const void *k_cache,
                            const void *v_cache, int bf16, int64_t S, int64_t g, int64_t group, int64_t D,
                            float scale, int64_t window, const int32_t *pages, int64_t page_size,
                            float *out, int64_t ldo)
{
    /* keys k0.. (the first row's window start, down to a whole panel) are score columns 0.. */
    const int64_t lo = window_start(first + 1, window), k0 = lo / KEYS * KEYS;
    const int64_t Q = R * group, n = first + R, ns = (n - k0 + KEYS - 1) / KEYS * KEYS;
    float *qs = malloc(sizeof(float) * (Q * D + Q * ns + Q * D + KEYS * D + V_KEYS * D));
    if (!qs)
        return -1;
    float *scores = qs + Q * D, *o = scores + Q * ns, *kt = o + Q * D, *vt = kt + KEYS * D;
    for (int64_t r = 0; r < R; r++)  /* the scale folded into the queries */
        for (int64_t i = 0; i < group * D; i++)
            qs[r * group * D + i] = q[r * ldq + i] * scale;
    for (int64_t c0 = k0; c0 < n; c0 += KEYS) {
        load_k(k_cache, bf16, S, g, D, pages, page_size, c0, lo, n, kt);
        /* rows before c0 - first see none of these keys: their scores stay unset, masked below */
        const int64_t r0 = c0 > first ? c0 - first : 0;
        tiles(qs + r0 * group * D, Q - r0 * group, D, kt, KEYS, D, scores + r0 * group * ns + c0 - k0, ns, 0);
    }
    for (int64_t i = 0; i < Q; i++) {  /* query i is row i / group, position first + i / group */
        float *s = scores + i * ns;
        const int64_t seen = first + i / group + 1, from = window_start(seen, window);
        for (int64_t t = 0; t < from - k0; t++)
            s[t] = 0;
        softmax(s + from - k0, seen - from);
        for (int64_t t = seen - k0; t < ns; t++)
            s[t] = 0;
    }
    for (int64_t c0 = k0; c0 < n; c0 += V_KEYS) {
        const int64_t count = ns - (c0 - k0) < V_KEYS ? ns - (c0 - k0) : V_KEYS;
        load_v(v_cache, bf16, S, g, D, pages, page_size, c0, count, lo, n, vt);
        for (int64_t c = 0; c < D; c += KEYS)
            tiles(scores + c0 - k0, Q, ns, vt + c, D, count, o + c, D, c0 > k0);
    }
    for (int64_t r = 0; r < R; r++)
        memcpy(out + r * ldo, o + r * group * D, sizeof(float) * group * D);
    free(qs);
    return 0;
}
#endif
