/* MagicPIG decode loops that PyTorch can only express as dozens of small ragged-index ops, and
   the key hashing, where PyTorch's matmul of 64-long rows is slow. A decode step is one call
   (magicpig_decode), as the ~25 PyTorch ops around three calls took a fifth of its time.
   Twins: simhash, candidates and paged_sampled_attention in kvserve/attention/sparse/magicpig.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gemm.c"
#include "kv_element.h"

#define MIN_COLLISIONS 2  /* < 4: counts live in 2 bits of head_candidates' scratch */

/* Key ids in the tables are uint16 when T <= 65536 ("narrow"), else int32: the tables are L ids
   per key, more than the key's K/V, and half the bytes are also half the cache lines to read. */
static inline __attribute__((always_inline)) int64_t id_at(const void *ids, int64_t j, const int narrow)
{
    return narrow ? ((const uint16_t *)ids)[j] : ((const int32_t *)ids)[j];
}

/* CSR tables by counting sort: codes [N, T] (table i's bucket of key t, in [0, B)) -> offsets
   [N, B + 1] and sorted_ids [N, T] (uint16 when narrow, else int32), key ids ascending within
   each bucket. */
void magicpig_build(const int16_t *codes, int64_t N, int64_t T, int64_t B, int64_t *offsets, void *sorted_ids,
                    int64_t narrow)
{
    for (int64_t i = 0; i < N; i++) {
        const int16_t *c = codes + i * T;
        int64_t *off = offsets + i * (B + 1);
        memset(off, 0, (B + 1) * sizeof *off);
        for (int64_t t = 0; t < T; t++)
            off[c[t] + 1]++;
        for (int64_t b = 0; b < B; b++)
            off[b + 1] += off[b];
        for (int64_t t = 0; t < T; t++) {  /* off[b] walks to the end of bucket b ... */
            const int64_t j = i * T + off[c[t]]++;
            if (narrow)
                ((uint16_t *)sorted_ids)[j] = (uint16_t)t;
            else
                ((int32_t *)sorted_ids)[j] = (int32_t)t;
        }
        for (int64_t b = B; b > 0; b--)  /* ... which is where bucket b - 1 ended: shift back */
            off[b] = off[b - 1];
        off[0] = 0;
    }
}

/* One query head's candidates: every key found in its bucket (qc [L]) of at least 2 of the L
   tables of its KV head (sorted_ids [L, T], see id_at, and offsets [L, B + 1], CSR), and every
   one of the P keys outside the tables (extra [P, L] codes, ids T..T+P-1) with 2 equal codes ->
   ids, each once.
   mine: T bytes of counts, a head's tag in the high 6 bits and its count in the low 2, so that a
   new head (a new `tag`, 1..63) needs no pass to clear the last one's (a stale tag reads as 0). */
static inline __attribute__((always_inline)) int64_t head_candidates(
    const void *sorted_ids, const int narrow, const int64_t *offsets, const int16_t *qc, const int16_t *extra,
    int64_t L, int64_t T, int64_t B, int64_t P, uint8_t *mine, unsigned tag, int32_t *ids)
{
    const int64_t id_bytes = narrow ? 2 : 4;
    const uint8_t fresh = (uint8_t)(tag << 2);
    int64_t n = 0, begin[L], end[L];
    /* the tables are tens of MB, so each bucket is a cache miss: fetch them all first */
    for (int64_t l = 0; l < L; l++)
        __builtin_prefetch(offsets + l * (B + 1) + qc[l]);
    for (int64_t l = 0; l < L; l++) {
        const int64_t *off = offsets + l * (B + 1) + qc[l];
        begin[l] = off[0];
        end[l] = off[1];
        const char *bucket = (const char *)sorted_ids + (l * T + begin[l]) * id_bytes;
        for (int64_t b = 0; b < (end[l] - begin[l]) * id_bytes + 64; b += 64)  /* each 64-byte line of it */
            __builtin_prefetch(bucket + b);
    }
    for (int64_t l = 0; l < L; l++) {
        const void *table = (const char *)sorted_ids + l * T * id_bytes;
        for (int64_t j = begin[l]; j < end[l]; j++) {
            const int64_t id = id_at(table, j, narrow);
            const uint8_t s = (mine[id] & ~3) == fresh ? mine[id] : fresh;
            if ((s & 3) < MIN_COLLISIONS) {
                mine[id] = s + 1;
                if ((s & 3) + 1 == MIN_COLLISIONS)
                    ids[n++] = (int32_t)id;
            }
        }
    }
    for (int64_t p = 0; p < P; p++) {
        int64_t hits = 0;
        for (int64_t l = 0; l < L; l++)
            hits += extra[p * L + l] == qc[l];
        if (hits >= MIN_COLLISIONS)
            ids[n++] = (int32_t)(T + p);
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

/* Gemma 2's bound on a scaled score (softcap > 0), or the score as it is */
static inline float capped(float s, float softcap)
{
    return softcap > 0 ? softcap * tanhf(s / softcap) : s;
}

/* One key into a head's online softmax (top, total, acc): rescale what was summed under the old
   maximum when the logit is a new one */
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

/* One query head qh [D] over its KV head's caches [S, D] (float32, or bfloat16 when bf16): the n
   sampled keys ids (key i at row slots[i]), importance-weighted, and the n_dense keys at
   dense_slots with weight 1, in one softmax (what merging a dense attention over them by
   log-sum-exp gives, without its own pass). mean [D]: the KV head's key mean; log_w: see
   log_weight. softcap > 0 caps the scaled scores (Gemma 2). -> out [D], lse (natural log; -inf with no key).
   Inlined into one copy per cache dtype: with the dtype a variable, GCC leaves the loops over D
   scalar (1.5x the time at 32k). */
static inline __attribute__((always_inline)) void head_softmax(
    const float *qh, const void *k_cache, const void *v_cache, const int bf16, const int64_t *slots,
    const int32_t *ids, int64_t n, const int64_t *dense_slots, int64_t n_dense, const float *mean, int64_t D,
    float scale, float softcap, const float *log_w, int64_t table_n, float *out, float *lse)
{
    float qm = 0, qn = 0, mm = 0, top = -INFINITY, total = 0;
    for (int64_t d = 0; d < D; d++) {
        qm += qh[d] * mean[d];
        qn += qh[d] * qh[d];
        mm += mean[d] * mean[d];
        out[d] = 0;
    }
    qn = sqrtf(qn);
    for (int64_t j = 0; j < n_dense; j++) {
        const int64_t row = dense_slots[j] * D;
        float qk = 0;
        #pragma omp simd reduction(+:qk)
        for (int64_t d = 0; d < D; d++)
            qk += qh[d] * kv_load(k_cache, row + d, bf16);
        softmax_add(capped(qk * scale, softcap), v_cache, row, bf16, D, &top, &total, out);
    }
    const int64_t elem = bf16 ? 2 : 4, ahead = 8;
    for (int64_t i = 0; i < n; i++) {
        /* the rows are scattered over the whole cache: fetch ahead, and the slot that says where
           a row is further ahead still (slots are as scattered; without it, 1.3x the time) */
        if (i + 2 * ahead < n)
            __builtin_prefetch(slots + ids[i + 2 * ahead]);
        if (i + ahead < n) {
            const int64_t next = slots[ids[i + ahead]] * D * elem;
            for (int64_t b = 0; b < D * elem; b += 64) {
                __builtin_prefetch((const char *)k_cache + next + b);
                __builtin_prefetch((const char *)v_cache + next + b);
            }
        }
        const int64_t row = slots[ids[i]] * D;
        float qk = 0, km = 0, kk = 0;
        #pragma omp simd reduction(+:qk, km, kk)  /* lets the sums vectorize: -ffast-math not needed */
        for (int64_t d = 0; d < D; d++) {
            const float key = kv_load(k_cache, row + d, bf16);
            qk += qh[d] * key;
            km += key * mean[d];
            kk += key * key;
        }
        /* the cosine to the centred key k - mean (what was hashed); the raw key gives the score */
        float centred = kk - 2 * km + mm, norm = qn * sqrtf(centred > 0 ? centred : 0);
        float cos = (qk - qm) / (norm > 1e-12f ? norm : 1e-12f);
        float logit = capped(qk * scale, softcap) - log_weight(cos, log_w, table_n);
        softmax_add(logit, v_cache, row, bf16, D, &top, &total, out);
    }
    for (int64_t d = 0; d < D; d++)
        out[d] = total > 0 ? out[d] / total : 0;
    *lse = total > 0 ? top + logf(total) : -INFINITY;
}

static int64_t hash_rows(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                         int16_t *codes);

/* A MagicPIG decode step of one layer: the query q [H, D] hashed (or its codes given, qcodes
   [H, L]), each head's candidates (head_candidates; query head h reads KV head h / group, whose
   tables are sorted_ids [Hkv, L, T], uint16 when narrow, and offsets [Hkv, L, B + 1]) and their softmax with the dense
   keys (head_softmax; caches [Hkv, S, D]) -> out [H, D], lse [H]. extra [Hkv, cap, L] holds the
   codes of P keys outside the tables (ids T..T+P-1); the n_new keys after them (ids up to
   T+P+n_new-1, n_new <= cap - P) are hashed, centred by key_mean [Hkv, D], and written there
   first. Returns the number of (head, key) pairs sampled; -1 when out of memory, -2 when it can't
   hash (no AVX2: pass qcodes and no new key). found: NULL, or room [H, T + P + n_new] for each
   head's candidate ids, -1 after the last. */
int64_t magicpig_decode(const float *q, const int16_t *qcodes, int64_t H, int64_t group, int64_t D, float scale,
                        float softcap,
                        const void *k_cache, const void *v_cache, int64_t bf16, int64_t S, const int64_t *slots,
                        const int64_t *dense_slots, int64_t n_dense, const float *key_mean, const void *sorted_ids,
                        int64_t narrow, const int64_t *offsets, int64_t K, int64_t L, int64_t T, int16_t *extra, int64_t P,
                        int64_t cap, int64_t n_new, const float *panels, int64_t n_panels, const float *log_w,
                        int64_t table_n, int32_t *found, float *out, float *lse)
{
    const int64_t B = (int64_t)1 << K, elem = bf16 ? 2 : 4, hkv = H / group, q_rows = qcodes ? 0 : H;
    const int64_t rows = q_rows + hkv * n_new;  /* to hash: the query's (unless given), each KV head's new keys */
    int16_t *codes = malloc((H + hkv * n_new) * L * sizeof *codes);
    float *x = malloc((rows > 0 ? rows : 1) * D * sizeof *x);
    int64_t failed = codes && x ? 0 : -1;
    if (!failed) {
        if (qcodes)
            memcpy(codes, qcodes, H * L * sizeof *codes);
        else
            memcpy(x, q, H * D * sizeof *x);
        for (int64_t kv = 0; kv < hkv; kv++)  /* centred, as the tables' keys were */
            for (int64_t j = 0; j < n_new; j++)
                for (int64_t d = 0; d < D; d++)
                    x[(q_rows + kv * n_new + j) * D + d] = kv_load(k_cache, (kv * S + slots[T + P + j]) * D + d, bf16)
                                                           - key_mean[kv * D + d];
        if (rows && hash_rows(x, rows, D, panels, n_panels, K, L, codes + (H - q_rows) * L) < 0)
            failed = -2;
    }
    if (failed) {
        free(codes);
        free(x);
        return failed;
    }
    for (int64_t kv = 0; kv < hkv; kv++)
        memcpy(extra + (kv * cap + P) * L, codes + (H + kv * n_new) * L, n_new * L * sizeof *codes);
    P += n_new;
    int64_t pairs = 0;
    /* each thread takes a range of heads: the reads of scattered rows are bound by how many misses
       a core keeps in flight, so a second core nearly halves the time */
    #pragma omp parallel reduction(+:pairs)
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        uint8_t *mine = calloc(T > 0 ? T : 1, 1);
        int32_t *ids = malloc((T + P > 0 ? T + P : 1) * sizeof *ids);
        if (!mine || !ids)
            failed = 1;
        unsigned tag = 0;
        for (int64_t h = H * t / threads; h < H * (t + 1) / threads && mine && ids; h++) {
            if (++tag == 64) {
                memset(mine, 0, T);
                tag = 1;
            }
            const int64_t kv = h / group;
            const int64_t *off = offsets + kv * L * (B + 1);
            const int16_t *qc = codes + h * L, *ex = extra + kv * cap * L;
            const int64_t n = narrow ? head_candidates((const uint16_t *)sorted_ids + kv * L * T, 1, off, qc, ex, L, T,
                                                       B, P, mine, tag, ids)
                                     : head_candidates((const int32_t *)sorted_ids + kv * L * T, 0, off, qc, ex, L, T,
                                                       B, P, mine, tag, ids);
            pairs += n;
            if (found) {
                memcpy(found + h * (T + P), ids, n * sizeof *ids);
                if (n < T + P)
                    found[h * (T + P) + n] = -1;
            }
            const char *k_head = (const char *)k_cache + kv * S * D * elem, *v_head = (const char *)v_cache + kv * S * D * elem;
            if (bf16)
                head_softmax(q + h * D, k_head, v_head, 1, slots, ids, n, dense_slots, n_dense, key_mean + kv * D, D,
                             scale, softcap, log_w, table_n, out + h * D, lse + h);
            else
                head_softmax(q + h * D, k_head, v_head, 0, slots, ids, n, dense_slots, n_dense, key_mean + kv * D, D,
                             scale, softcap, log_w, table_n, out + h * D, lse + h);
        }
        free(mine);
        free(ids);
    }
    free(codes);
    free(x);
    return failed ? -1 : pairs;
}

#ifdef __AVX2__
#define HASH_ROWS 48 /* rows projected at a time: their [48, K * L] products stay in L2 */

/* SimHash codes of x [T, D]: bit j of code l is x . proj[:, l * K + j] > 0, proj given as P
   panels [D, 16] of 16 columns (zero columns past K * L) -> codes [T, L]. K <= 15. Returns 0, or
   -1 when out of memory. */
static int64_t hash_rows(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                         int16_t *codes)
{
    /* a decode step hashes a query's few rows: room for those only */
    float *y = aligned_alloc(32, (T < HASH_ROWS ? T : HASH_ROWS) * P * 16 * sizeof(float));
    uint8_t *bits = calloc(P * 2 + 4, 1);  /* a row's signs, and room for a 4-byte read at the end */
    for (int64_t r0 = 0; r0 < T && y && bits; r0 += HASH_ROWS) {
        const int64_t rows = T - r0 < HASH_ROWS ? T - r0 : HASH_ROWS;
        for (int64_t p = 0; p < P; p++)
            tiles(x + r0 * D, rows, D, panels + p * D * 16, 16, D, y + p * 16, P * 16, 0);
        for (int64_t r = 0; r < rows; r++) {
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
    const int64_t ok = y && bits;
    free(y);
    free(bits);
    return ok ? 0 : -1;
}

/* hash_rows of x [T, D], its chunks of HASH_ROWS rows split between threads (the tables' build) */
int64_t magicpig_hash(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                      int16_t *codes)
{
    int64_t failed = 0;
    #pragma omp parallel for schedule(static) reduction(|:failed)
    for (int64_t r0 = 0; r0 < T; r0 += HASH_ROWS)
        failed |= hash_rows(x + r0 * D, T - r0 < HASH_ROWS ? T - r0 : HASH_ROWS, D, panels, P, K, L, codes + r0 * L) < 0;
    return failed ? -1 : 0;
}
#else
static int64_t hash_rows(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                         int16_t *codes) { return -1; }
int64_t magicpig_hash(const float *x, int64_t T, int64_t D, const float *panels, int64_t P, int64_t K, int64_t L,
                      int16_t *codes) { return -1; }  /* simhash's PyTorch ops instead */
#endif
