/* Attention of a block of consecutive query tokens of one sequence (a prompt chunk) over its paged
   K/V, for decode.c, which includes it after gemm.c and paged_attention.c. Row by row (the decode
   kernel) every query reads every key again; here the block's query heads of one KV head are the
   rows of two small matrix products per 16 keys, scores = Q K^T and out += P V, on gemm.c's FMA
   tiles, so each key is read once per block. */
#ifdef __AVX2__
#define KEYS 16 /* gemm.c's panel width */

/* Keys c0..c0+15 of KV head g as floats: K transposed to kt [D, 16] (when kt), V to vt [16, D] (when
   vt); keys at n and beyond are zero */
static void load_keys(const void *k_cache, const void *v_cache, int bf16, int64_t S, int64_t g, int64_t D,
                      const int32_t *pages, int64_t page_size, int64_t c0, int64_t n, float *kt, float *vt)
{
    for (int64_t j = 0; j < KEYS; j++) {
        const int64_t t = c0 + j;
        const int64_t row = t < n ? (g * S + (int64_t)pages[t / page_size] * page_size + t % page_size) * D : -1;
        for (int64_t d = 0; d < D; d++) {
            if (kt)
                kt[d * KEYS + j] = row < 0 ? 0 : kv_load(k_cache, row + d, bf16);
            if (vt)
                vt[j * D + d] = row < 0 ? 0 : kv_load(v_cache, row + d, bf16);
        }
    }
}

/* Query rows 0..R-1 (q: row 0's heads of KV head g, rows ldq apart) at positions first..first+R-1
   -> out (row r's heads at out + r * ldo). D a multiple of 16. Returns 0, or -1 when out of memory. */
static int64_t attend_block(const float *q, int64_t ldq, int64_t R, int64_t first, const void *k_cache,
                            const void *v_cache, int bf16, int64_t S, int64_t g, int64_t group, int64_t D,
                            float scale, const int32_t *pages, int64_t page_size, float *out, int64_t ldo)
{
    const int64_t Q = R * group, n = first + R, ns = (n + KEYS - 1) / KEYS * KEYS;
    float *qs = malloc(sizeof(float) * (Q * D + Q * ns + Q * D + 2 * KEYS * D));
    if (!qs)
        return -1;
    float *scores = qs + Q * D, *o = scores + Q * ns, *kt = o + Q * D, *vt = kt + KEYS * D;
    for (int64_t r = 0; r < R; r++)  /* the scale folded into the queries */
        for (int64_t i = 0; i < group * D; i++)
            qs[r * group * D + i] = q[r * ldq + i] * scale;
    for (int64_t c0 = 0; c0 < n; c0 += KEYS) {
        load_keys(k_cache, v_cache, bf16, S, g, D, pages, page_size, c0, n, kt, NULL);
        /* rows before c0 - first see none of these keys: their scores stay unset, masked below */
        const int64_t r0 = c0 > first ? c0 - first : 0;
        tiles(qs + r0 * group * D, Q - r0 * group, D, kt, KEYS, D, scores + r0 * group * ns + c0, ns, 0);
    }
    for (int64_t i = 0; i < Q; i++) {  /* query i is row i / group, position first + i / group */
        float *s = scores + i * ns, best = -INFINITY, total = 0;
        const int64_t seen = first + i / group + 1;
        for (int64_t t = 0; t < seen; t++)
            best = s[t] > best ? s[t] : best;
        for (int64_t t = 0; t < seen; t++)
            total += s[t] = exp_neg(s[t] - best);
        for (int64_t t = 0; t < seen; t++)
            s[t] /= total;
        for (int64_t t = seen; t < ns; t++)
            s[t] = 0;
    }
    for (int64_t c0 = 0; c0 < n; c0 += KEYS) {
        load_keys(k_cache, v_cache, bf16, S, g, D, pages, page_size, c0, n, NULL, vt);
        for (int64_t c = 0; c < D; c += KEYS)
            tiles(scores + c0, Q, ns, vt + c, D, KEYS, o + c, D, c0 > 0);
    }
    for (int64_t r = 0; r < R; r++)
        memcpy(out + r * ldo, o + r * group * D, sizeof(float) * group * D);
    free(qs);
    return 0;
}
#endif
