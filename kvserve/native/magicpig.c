/* MagicPIG decode loops that PyTorch can only express as dozens of small ragged-index ops, and
   the key hashing, where PyTorch's matmul of 64-long rows is slow.
   Twins: _candidates_torch, sampled_attention and simhash in kvserve/attention/sparse/magicpig.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gemm.c"
#include "kv_element.h"

#define MIN_COLLISIONS 2  /* < 4: counts live in 2 bits of magicpig_candidates' scratch */

/* CSR tables by counting sort: codes [N, T] (table i's bucket of key t, in [0, B)) -> offsets
   [N, B + 1] and sorted_ids [N, T], key ids ascending within each bucket. */
void magicpig_build(const int16_t *codes, int64_t N, int64_t T, int64_t B, int64_t *offsets, int32_t *sorted_ids)
{
    for (int64_t i = 0; i < N; i++) {
        const int16_t *c = codes + i * T;
        int64_t *off = offsets + i * (B + 1);
        int32_t *ids = sorted_ids + i * T;
        memset(off, 0, (B + 1) * sizeof *off);
        for (int64_t t = 0; t < T; t++)
            off[c[t] + 1]++;
        for (int64_t b = 0; b < B; b++)
            off[b + 1] += off[b];
        for (int64_t t = 0; t < T; t++)  /* off[b] walks to the end of bucket b ... */
            ids[off[c[t]]++] = (int32_t)t;
        for (int64_t b = B; b > 0; b--)  /* ... which is where bucket b - 1 ended: shift back */
            off[b] = off[b - 1];
        off[0] = 0;
    }
}

/* For each query head h (KV head h / group), every key found in its bucket of at least 2 of the
   L tables: sorted_ids [Hkv, L, T] and offsets [Hkv, L, B + 1] are the CSR tables, qcodes [H, L]
   the query's bucket per table, extra [Hkv, P, L] the codes of P keys outside the tables (ids
   T..T+P-1). Pairs are written grouped by head (out_*: room for H * (T + P)), each once; returns
   their count, or -1 when out of memory. seen: T zeroed bytes of scratch, zeroed again on return. */
int64_t magicpig_candidates(const int32_t *sorted_ids, const int64_t *offsets, const int64_t *qcodes,
                            const int16_t *extra, int64_t H, int64_t group, int64_t L, int64_t T,
                            int64_t B, int64_t P, uint8_t *seen, int64_t *out_heads, int64_t *out_ids)
{
    const int64_t max_threads = omp_get_max_threads();
    int64_t found[max_threads], first_head[max_threads], ran = 1, failed = 0;
    /* each thread takes a range of heads and writes their pairs from the first one's room on */
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t h0 = H * t / threads, h1 = H * (t + 1) / threads;
        /* mine[id]: a head's tag in the high 6 bits and its count of collisions in the low 2, so
           that a new head needs no pass to clear the last one's counts (a stale tag reads as 0) */
        uint8_t *mine = t == 0 ? seen : calloc(T > 0 ? T : 1, 1);
        int64_t n = 0, begin[L], end[L], *heads_out = out_heads + h0 * (T + P), *ids_out = out_ids + h0 * (T + P);
        unsigned tag = 0;
        if (!mine)
            failed = 1;
        for (int64_t h = h0; h < h1 && mine; h++) {
            if (++tag == 64) {
                memset(mine, 0, T);
                tag = 1;
            }
            const uint8_t fresh = (uint8_t)(tag << 2);
            const int64_t kv = h / group, *qc = qcodes + h * L;
            /* the tables are tens of MB, so each bucket is a cache miss: fetch a few buckets ahead */
            for (int64_t l = 0; l < L; l++)
                __builtin_prefetch(offsets + (kv * L + l) * (B + 1) + qc[l]);
            for (int64_t l = 0; l < L; l++) {
                const int64_t *off = offsets + (kv * L + l) * (B + 1) + qc[l];
                begin[l] = off[0];
                end[l] = off[1];
                __builtin_prefetch(sorted_ids + (kv * L + l) * T + begin[l]);
            }
            for (int64_t l = 0; l < L; l++) {
                const int32_t *ids = sorted_ids + (kv * L + l) * T;
                for (int64_t j = begin[l]; j < end[l]; j++) {
                    const int32_t id = ids[j];
                    const uint8_t s = (mine[id] & ~3) == fresh ? mine[id] : fresh;
                    if ((s & 3) < MIN_COLLISIONS) {
                        mine[id] = s + 1;
                        if ((s & 3) + 1 == MIN_COLLISIONS) {
                            heads_out[n] = h;
                            ids_out[n++] = id;
                        }
                    }
                }
            }
            for (int64_t p = 0; p < P; p++) {
                const int16_t *codes = extra + (kv * P + p) * L;
                int64_t hits = 0;
                for (int64_t l = 0; l < L; l++)
                    hits += codes[l] == qc[l];
                if (hits >= MIN_COLLISIONS) {
                    heads_out[n] = h;
                    ids_out[n++] = T + p;
                }
            }
        }
        if (mine == seen)
            memset(seen, 0, T);
        else
            free(mine);
        found[t] = n;
        first_head[t] = h0;
        if (t == 0)
            ran = threads;
    }
    if (failed)
        return -1;
    int64_t n = 0;  /* the threads' runs of pairs, moved down to follow one another */
    for (int64_t t = 0; t < ran; t++) {
        memmove(out_heads + n, out_heads + first_head[t] * (T + P), found[t] * sizeof *out_heads);
        memmove(out_ids + n, out_ids + first_head[t] * (T + P), found[t] * sizeof *out_ids);
        n += found[t];
    }
    return n;
}

/* ln(w + eps) at this cosine, interpolated in the table of its values at n + 1 evenly spaced
   cosines from -1 to 1 (exact w costs four double-precision transcendentals a pair) */
static inline float log_weight(float cos, const float *table, int64_t n)
{
    float x = (cos + 1) * 0.5f * n;
    x = x < 0 ? 0 : x > n ? n : x;
    int64_t i = (int64_t)x;
    if (i == n)
        return table[n];
    return table[i] + (x - i) * (table[i + 1] - table[i]);
}

/* One key of head h into its online softmax (top, total, acc): rescale what was summed under the
   old maximum when the logit is a new one */
static inline __attribute__((always_inline)) void softmax_add(float logit, const void *v_cache, int64_t row,
                                                              const int bf16, int64_t D, float *top, float *total,
                                                              float *acc)
{
    if (logit > *top) {
        const float shrink = expf(*top - logit);
        *total *= shrink;
        for (int64_t d = 0; d < D; d++)
            acc[d] *= shrink;
        *top = logit;
    }
    const float e = expf(logit - *top);
    *total += e;
    for (int64_t d = 0; d < D; d++)
        acc[d] += e * kv_load(v_cache, row + d, bf16);
}

/* Importance-weighted softmax over n (head, key) pairs: key id i of KV head kv lives at row
   kv * S + slots[i] of the caches [Hkv, S, D] (float32, or bfloat16 when bf16). The keys at the
   n_dense dense_slots join every head's softmax with weight 1: what merging a dense attention
   over them by log-sum-exp gives, without its own pass. q [H, D], key_mean [Hkv, D], log_w: see
   log_weight; out [H, D] and lse [H] (natural log; -inf for a head with no key).
   Inlined into one copy per cache dtype: with the dtype a variable, GCC leaves the loops over D
   scalar (1.5x the time at 32k). */
static inline __attribute__((always_inline)) void attention_as(
    const float *q, const void *k_cache, const void *v_cache, const int bf16, int64_t S, const int64_t *slots,
    const int64_t *heads, const int64_t *ids, int64_t n, const int64_t *dense_slots, int64_t n_dense,
    const float *key_mean, int64_t H, int64_t group, int64_t D, float scale, const float *log_w, int64_t table_n,
    float *out, float *lse)
{
    /* each thread takes a range of heads: the reads of scattered rows are bound by how many misses
       a core keeps in flight, so a second core nearly halves the time */
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t h0 = H * t / threads, h1 = H * (t + 1) / threads;
        float qm[H], qn[H], mm[H], top[H], total[H];
        for (int64_t h = h0; h < h1; h++) {
            const float *qh = q + h * D, *mean = key_mean + h / group * D;
            qm[h] = qn[h] = mm[h] = total[h] = 0;
            top[h] = -INFINITY;
            for (int64_t d = 0; d < D; d++) {
                qm[h] += qh[d] * mean[d];
                qn[h] += qh[d] * qh[d];
                mm[h] += mean[d] * mean[d];
                out[h * D + d] = 0;
            }
            qn[h] = sqrtf(qn[h]);
            for (int64_t j = 0; j < n_dense; j++) {
                const int64_t row = (h / group * S + dense_slots[j]) * D;
                float qk = 0;
                #pragma omp simd reduction(+:qk)
                for (int64_t d = 0; d < D; d++)
                    qk += qh[d] * kv_load(k_cache, row + d, bf16);
                softmax_add(qk * scale, v_cache, row, bf16, D, &top[h], &total[h], out + h * D);
            }
        }
        /* this thread's pairs: one range when they come grouped by head, as candidates() writes them */
        int64_t first = 0, last = n;
        while (first < n && (heads[first] < h0 || heads[first] >= h1))
            first++;
        while (last > first && (heads[last - 1] < h0 || heads[last - 1] >= h1))
            last--;
        const int64_t elem = bf16 ? 2 : 4, ahead = 8;
        for (int64_t i = first; i < last; i++) {
            const int64_t h = heads[i];
            if (h < h0 || h >= h1)
                continue;
            /* the rows are scattered over the whole cache: fetch ahead, and the slot that says where
               a row is further ahead still (slots are as scattered; without it, 1.3x the time) */
            if (i + 2 * ahead < last)
                __builtin_prefetch(slots + ids[i + 2 * ahead]);
            if (i + ahead < last) {
                const int64_t next = (heads[i + ahead] / group * S + slots[ids[i + ahead]]) * D * elem;
                for (int64_t b = 0; b < D * elem; b += 64) {
                    __builtin_prefetch((const char *)k_cache + next + b);
                    __builtin_prefetch((const char *)v_cache + next + b);
                }
            }
            const int64_t kv = h / group, row = (kv * S + slots[ids[i]]) * D;
            const float *qh = q + h * D, *mean = key_mean + kv * D;
            float qk = 0, km = 0, kk = 0;
            #pragma omp simd reduction(+:qk, km, kk)  /* lets the sums vectorize: -ffast-math not needed */
            for (int64_t d = 0; d < D; d++) {
                const float key = kv_load(k_cache, row + d, bf16);
                qk += qh[d] * key;
                km += key * mean[d];
                kk += key * key;
            }
            /* the cosine to the centred key k - mean (what was hashed); the raw key gives the score */
            float centred = kk - 2 * km + mm[h], norm = qn[h] * sqrtf(centred > 0 ? centred : 0);
            float logit = qk * scale - log_weight((qk - qm[h]) / (norm > 1e-12f ? norm : 1e-12f), log_w, table_n);
            softmax_add(logit, v_cache, row, bf16, D, &top[h], &total[h], out + h * D);
        }
        for (int64_t h = h0; h < h1; h++) {
            for (int64_t d = 0; d < D; d++)
                out[h * D + d] = total[h] > 0 ? out[h * D + d] / total[h] : 0;
            lse[h] = total[h] > 0 ? top[h] + logf(total[h]) : -INFINITY;
        }
    }
}

void magicpig_attention(const float *q, const void *k_cache, const void *v_cache, int64_t bf16, int64_t S,
                        const int64_t *slots, const int64_t *heads, const int64_t *ids, int64_t n,
                        const int64_t *dense_slots, int64_t n_dense, const float *key_mean, int64_t H, int64_t group,
                        int64_t D, float scale, const float *log_w, int64_t table_n, float *out, float *lse)
{
    if (bf16)
        attention_as(q, k_cache, v_cache, 1, S, slots, heads, ids, n, dense_slots, n_dense, key_mean, H, group, D,
                     scale, log_w, table_n, out, lse);
    else
        attention_as(q, k_cache, v_cache, 0, S, slots, heads, ids, n, dense_slots, n_dense, key_mean, H, group, D,
                     scale, log_w, table_n, out, lse);
}

#ifdef __AVX2__
#define HASH_ROWS 48 /* rows projected at a time: their [48, K * L] products stay in L2 */

/* SimHash codes of x [T, D]: bit j of code l is x . proj[:, l * K + j] > 0, proj given as P
   panels [D, 16] of 16 columns (zero columns past K * L) -> codes [T, L]. K <= 15. Returns 0, or
   -1 when out of memory. */
int64_t magicpig_hash(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                      int16_t *codes)
{
    int64_t failed = 0;
    #pragma omp parallel
    {
        /* a decode step hashes a query's few rows: room for those only */
        float *y = aligned_alloc(32, (T < HASH_ROWS ? T : HASH_ROWS) * P * 16 * sizeof(float));
        uint8_t *bits = calloc(P * 2 + 4, 1);  /* a row's signs, and room for a 4-byte read at the end */
        if (!y || !bits)
            failed = 1;
        #pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < T; r0 += HASH_ROWS) {
            const int64_t rows = T - r0 < HASH_ROWS ? T - r0 : HASH_ROWS;
            for (int64_t p = 0; p < P && y && bits; p++)
                tiles(x + r0 * D, rows, D, panels + p * D * 16, 16, D, y + p * 16, P * 16, 0);
            for (int64_t r = 0; r < rows && y && bits; r++) {
                for (int64_t c = 0; c < P * 16; c += 8)
                    bits[c / 8] = (uint8_t)_mm256_movemask_ps(
                        _mm256_cmp_ps(_mm256_loadu_ps(y + r * P * 16 + c), _mm256_setzero_ps(), _CMP_GT_OQ));
                for (int64_t l = 0; l < L; l++) {  /* bits l * K .. l * K + K - 1, lowest first */
                    uint32_t word;
                    memcpy(&word, bits + l * K / 8, 4);
                    codes[(r0 + r) * L + l] = (int16_t)((word >> (l * K % 8)) & ((1u << K) - 1));
                }
            }
        }
        free(y);
        free(bits);
    }
    return failed ? -1 : 0;
}
#else
int64_t magicpig_hash(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                      int16_t *codes) { return -1; }  /* simhash's PyTorch ops instead */
#endif
