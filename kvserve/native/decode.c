/* An engine step (decode tokens, prompt chunks, any mix of sequences) of a Llama-family or Gemma 3
   model with int4 or int8-group weights, all layers in one call: the eager PyTorch step spends a
   fifth (a batch of decodes) to two thirds (one stream) of its time dispatching ~15 small ops a
   layer, not in matmuls. Same math as kvserve/model/llama.py (rotate-half RoPE, GQA, SiLU-gated
   MLP) and model/gemma.py (q/k norms, norms after attention and MLP, GeGLU, a local RoPE table for
   sliding layers) in float32, with the matmuls of qmatmul.c (a few rows) and gemm.c (more); K/V go
   to the paged cache like TorchRefAttention's. Gemma's (1 + w) norm weights come added. */
#include <stdlib.h>

/* one translation unit: the kernels inline here; native.load hashes every source */
#include "gemm.c"
#include "paged_attention.c"
#include "block_attention.c"
#include "qmatmul.c"

#define PARALLEL_ROWS 4  /* fewer rows than this: the threads' start-up costs more than the loops */
/* up to this many rows (a decode, a verification's k + 1, a few decodes) the int4 linears run on
   qmatmul.c, which unpacks each group of weights once for 8 rows: gemm.c's panels cost ~12 ms a step
   on SmolLM2 whatever the rows (issue 27: a 2-row call cost 1.75x a 1-row one on them) */
#define MATMUL_ROWS 8

typedef struct {
    const void *w;          /* int4: _convert_weight_to_int4pack_for_cpu layout */
    const void *scales;     /* int4: [K / G, N, 2] bf16 (scale, zero) */
    const float *bias;      /* [N] or NULL */
    int64_t n, k, group, block;
    int64_t int8;           /* w: int8 [N, K], scales: float [N, K / G] (QuantizedLinear.int8_groups) */
} Linear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    Linear qkv, o, gate_up, down;
    /* a mixture of experts (num_experts > 0) in place of gate_up / down: a float32 router
       [num_experts, hidden] and each expert's own gate_up and down */
    int64_t num_experts, top_k, norm_topk;
    const float *router;
    const Linear *experts_gate_up, *experts_down;
    /* Gemma 3: norms of attention's and the MLP's outputs, per-head q/k norms (each NULL: none),
       and whether RoPE takes the local table (sliding layers) */
    const float *post_attn_norm, *post_mlp_norm, *q_norm, *k_norm;
    int64_t local_rope;
    int64_t qk_norm_full;   /* q_norm / k_norm over all heads at once (OLMoE), else per head */
} Layer;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    int64_t kv_bf16;          /* cache dtype: bfloat16, else float32 */
    int64_t slots;            /* num_pages * page_size */
    void *k_cache, *v_cache;  /* [layers per page, kv_heads, slots, head_dim] */
    const Layer *layers;
    const float *final_norm;
    const int64_t *windows;   /* [num_layers]: a layer's sliding window (keys a query reads), <= 0 none */
    /* tensor parallelism: sums o's and down's outputs [T, hidden] over the ranks in place (a
       collective of the caller's); 0, or nonzero when it failed. NULL on one process */
    int64_t (*reduce)(float *x, int64_t n);
    int64_t gelu;             /* MLP activation: tanh-approximated GELU (GeGLU), else SiLU */
    /* KV groups (kvserve/kv/groups.py): layer l's K/V lives at cache slot layer_slot[l] of the pages
       of group layer_group[l]'s page table */
    const int64_t *layer_group, *layer_slot;
    float softcap;            /* > 0: attention scores capped at +-softcap (tanh; Gemma 2) */
    int64_t rotary_dim;       /* RoPE rotates each head's first rotary_dim dims */
    /* attention policies (kvserve/attention/sparse/): in a global layer (no window), the caller's
       attention of the step's policy rows, rows[i] the row of its i-th (-1: dropped at the last
       layer), their K/V already in the cache: reads q from qkv [T, qkv_n], writes out [T, H, D];
       0, or nonzero when it failed. NULL: no policies */
    int64_t (*policy)(int64_t layer, float *qkv, int64_t qkv_n, float *out, int64_t T, int64_t n, const int64_t *rows);
} Model;

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out)
{
    float ss = 0;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 squares = _mm256_setzero_ps();  /* GCC keeps a float sum scalar, in order */
    for (; i + 8 <= n; i += 8)
        squares = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), squares);
    ss = sum8(squares);
#endif
    for (; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1 / sqrtf(ss / n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * r * w[i];
}

#define INT8_MATMUL_ROWS 8  /* fewer rows: int8 products (scratch: 10 * widest bytes a row); more: gemm.c */

/* 0, or -1 when out of memory */
static int64_t linear(const Linear *l, const float *x, int64_t M, float *y, void *scratch)
{
    if (l->int8 && M < INT8_MATMUL_ROWS)
        int8_matmul(x, M, (const int8_t *)l->w, (const float *)l->scales, l->n, l->k, l->group, y, scratch);
    else if (l->int8) {
        if (int8_gemm(x, M, (const int8_t *)l->w, (const float *)l->scales, l->n, l->k, l->group, y))
            return -1;
    } else if (M <= MATMUL_ROWS)
        int4_matmul(x, M, l->w, l->scales, l->n, l->k, l->group, l->block, y, scratch);
    else if (int4_gemm(x, M, l->w, l->scales, l->n, l->k, l->group, l->block, y))
        return -1;
    if (l->bias)
        for (int64_t i = 0; i < M * l->n; i++)
            y[i] += l->bias[i % l->n];
    return 0;
}

/* exp_neg's, so the loop over it vectorizes (libm's expf is a call per element) */
static inline float sigmoid(float x)
{
    const float e = exp_neg(-fabsf(x));
    return (x >= 0 ? 1.0f : e) / (1 + e);
}

/* x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), tanh from exp_neg so that loops vectorize */
static inline float gelu_tanh(float x)
{
    const float u = 0.7978845608f * (x + 0.044715f * x * x * x), e = exp_neg(-2 * fabsf(u));
    const float t = (1 - e) / (1 + e);
    return 0.5f * x * (1 + (u >= 0 ? t : -t));
}

/* x [heads, D] rotated in place by the position's cos/sin [R / 2]: each head's first R dims (partial
   rotary, as Phi-4-mini; R = D for most families) */
static void rope(float *x, int64_t heads, int64_t D, int64_t R, const float *cos, const float *sin)
{
    const int64_t half = R / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/* Each row of h [T, E] routed to its top_k experts (softmax over all experts, the top_k renormalised
   if norm_topk, as kvserve/model/moe.py), whose outputs, weighted, are added to x [T, E]. An expert
   runs once over the rows that chose it (gathered into rows_in [T, E]); gu [T, 2I], act [T, I] and
   proj [T, E] are its buffers. Returns 0, or -1 when out of memory. */
static int64_t experts(const Layer *L, const float *h, int64_t T, int64_t E, float *x, float *rows_in, float *gu,
                       float *act, float *proj, void *scratch)
{
    const int64_t NE = L->num_experts, K = L->top_k, I = L->experts_down[0].k;
    int64_t *choice = malloc(sizeof(int64_t) * (T * K + T)), *rows = choice + T * K;
    float *weight = malloc(sizeof(float) * (T * K + NE + T)), *probs = weight + T * K, *picked = probs + NE;
    int64_t status = 0;
    if (!choice || !weight) {
        free(choice);
        free(weight);
        return -1;
    }
    for (int64_t t = 0; t < T; t++) {
        float top = -INFINITY, sum = 0, kept = 0;
        for (int64_t e = 0; e < NE; e++) {
            float z = 0;
            for (int64_t i = 0; i < E; i++)
                z += L->router[e * E + i] * h[t * E + i];
            probs[e] = z;
            top = z > top ? z : top;
        }
        for (int64_t e = 0; e < NE; e++)
            sum += probs[e] = expf(probs[e] - top);
        for (int64_t j = 0; j < K; j++) {  /* the largest left, first index on ties (as topk) */
            int64_t best = 0;
            for (int64_t e = 1; e < NE; e++)
                if (probs[e] > probs[best])
                    best = e;
            choice[t * K + j] = best;
            kept += weight[t * K + j] = probs[best] / sum;
            probs[best] = -1;
        }
        if (L->norm_topk)
            for (int64_t j = 0; j < K; j++)
                weight[t * K + j] /= kept;
    }
    for (int64_t e = 0; e < NE && status == 0; e++) {
        int64_t n = 0;
        for (int64_t p = 0; p < T * K; p++)
            if (choice[p] == e) {
                rows[n] = p / K;
                picked[n] = weight[p];
                memcpy(rows_in + n * E, h + rows[n] * E, sizeof(float) * E);
                n++;
            }
        if (n == 0)
            continue;
        status |= linear(L->experts_gate_up + e, rows_in, n, gu, scratch);
        for (int64_t r = 0; r < n; r++)  /* gate, then up */
            for (int64_t i = 0; i < I; i++)
                act[r * I + i] = gu[r * 2 * I + i] * sigmoid(gu[r * 2 * I + i]) * gu[r * 2 * I + I + i];
        status |= linear(L->experts_down + e, act, n, proj, scratch);
        for (int64_t r = 0; r < n; r++)
            for (int64_t i = 0; i < E; i++)
                x[rows[r] * E + i] += picked[r] * proj[r * E + i];
    }
    free(choice);
    free(weight);
    return status;
}

#define BLOCK_ROWS 16  /* consecutive tokens of a sequence whose attention reads each key once */

/* Row t's query heads (q: row 0's, rows qkv_n apart) against the layer's cache rows of its positions
   0..pos[t] (the last `window` of them under the layer's sliding window) -> out [T, H, D]: a task
   per (block, KV head), a block being up to BLOCK_ROWS consecutive positions of one sequence; a
   decode (a block of one) is attend_heads' task, in pieces of its keys. Rows with skip[t] set
   (skip may be NULL) are left to the caller. Returns 0, or -1 when out of memory. */
static int64_t attend(const Model *m, int64_t layer, int64_t T, const float *q, int64_t qkv_n, const int32_t *pages,
                      const int64_t *page_starts, const int64_t *pos, int64_t page_size, const char *skip, float *out)
{
    const int64_t H = m->heads, Hkv = m->kv_heads, D = m->head_dim, group = H / Hkv, window = m->windows[layer];
    const int64_t offset = m->layer_slot[layer] * Hkv * m->slots * D * (m->kv_bf16 ? 2 : 4);
    const char *k = (const char *)m->k_cache + offset, *v = (const char *)m->v_cache + offset;
    int64_t *starts = malloc(sizeof(int64_t) * (T + 1)), blocks = 0, failed = 0, single = 0, multi = 0;
    HeadTask *singles = malloc(sizeof(HeadTask) * T * Hkv);
    if (!starts || !singles) {
        free(starts);
        free(singles);
        return -1;
    }
    for (int64_t t = 0; t < T; t++)
        if (t == 0 || page_starts[t] != page_starts[t - 1] || pos[t] != pos[t - 1] + 1
            || t - starts[blocks - 1] == BLOCK_ROWS || (skip && skip[t] != skip[t - 1]))
            starts[blocks++] = t;
    starts[blocks] = T;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t0 = starts[b], R = starts[b + 1] - t0;
        if (skip && skip[t0])  /* a block's rows are all skipped or none */
            continue;
#ifdef __AVX2__
        if (R > 1 && D % KEYS == 0) {  /* attend_block's, below */
            multi++;
            continue;
        }
#endif
        for (int64_t t = t0; t < t0 + R; t++)
            for (int64_t g = 0; g < Hkv; g++)
                singles[single++] = (HeadTask){q + t * qkv_n + g * group * D, pages + page_starts[t0], g, 0,
                                               window_start(pos[t] + 1, window), pos[t] + 1,
                                               out + (t * H + g * group) * D};
    }
#ifdef __AVX2__
    if (multi) {
        #pragma omp parallel for schedule(dynamic)
        for (int64_t task = 0; task < blocks * Hkv; task++) {
            const int64_t b = task / Hkv, g = task % Hkv, t0 = starts[b], R = starts[b + 1] - t0;
            if (R == 1 || D % KEYS || (skip && skip[t0]))
                continue;
            if (attend_block(q + t0 * qkv_n + g * group * D, qkv_n, R, pos[t0], k, v, (int)m->kv_bf16, m->slots, g,
                             group, D, m->scale, m->softcap, window, pages + page_starts[t0], page_size,
                             out + (t0 * H + g * group) * D, H * D))
                failed = 1;
        }
    }
#endif
    if (single && attend_heads(singles, single, k, v, (int)m->kv_bf16, m->slots, group, D, m->scale, m->softcap,
                               page_size))
        failed = 1;
    free(starts);
    free(singles);
    return failed ? -1 : 0;
}

/* Rows keep[0..kept) (ascending) of qkv [T, qkv_n] and x [T, E], their positions, page table
   starts and skip flags moved to rows 0..kept-1; policy row i to its kept row (-1: not kept) */
static void keep_rows(const int64_t *keep, int64_t kept, float *qkv, int64_t qkv_n, float *x, int64_t E,
                      const int64_t *pos, const int64_t *page_starts, int64_t *kept_pos, int64_t *kept_starts,
                      char *skip, int64_t *policy_rows, int64_t n_policy)
{
    for (int64_t i = 0; i < kept; i++) {
        memmove(qkv + i * qkv_n, qkv + keep[i] * qkv_n, sizeof(float) * qkv_n);
        memmove(x + i * E, x + keep[i] * E, sizeof(float) * E);
        kept_pos[i] = pos[keep[i]];
        kept_starts[i] = page_starts[keep[i]];
        if (skip)
            skip[i] = 0;
    }
    for (int64_t j = 0, i = 0; j < n_policy; j++) {  /* both ascending */
        while (i < kept && keep[i] < policy_rows[j])
            i++;
        policy_rows[j] = i < kept && keep[i] == policy_rows[j] ? i : -1;
        if (policy_rows[j] >= 0)
            skip[i] = 1;
    }
}

/* T tokens: row t is at position pos[t] of the sequence whose page table starts at
   pages[page_starts[t]] (with KV groups, group g's tables at pages + g * group_stride, laid out
   alike). Every row's K/V is written before any row attends, so the tokens of one
   sequence (a prompt chunk, in order) attend causally. x [T, hidden]: their embeddings, overwritten
   by the residual stream; cos/sin [T, D / 2]: their positions' rotations (cos_local/sin_local:
   those of layers with local_rope); out [kept, hidden]: the
   final normed hidden states of rows keep[0..kept) (ascending), the rows whose logits are wanted:
   the last layer computes no others past their K/V. policy_rows[0..n_policy) (ascending): rows whose
   attention m->policy computes in the global layers (their K/V written here). Returns 0, or -1 when
   out of memory (or a callback failed). */
int64_t decode_step(const Model *m, float *x, int64_t T, const float *cos, const float *sin,
                    const float *cos_local, const float *sin_local, const int32_t *pages,
                    const int64_t *page_starts, const int64_t *pos, int64_t page_size, const int64_t *keep,
                    int64_t kept, float *out, int64_t group_stride, const int64_t *policy_rows, int64_t n_policy)
{
    const int64_t H = m->heads, Hkv = m->kv_heads, D = m->head_dim, I = m->intermediate, E = m->hidden;
    const int64_t qkv_n = (H + 2 * Hkv) * D, widest = E > I ? (E > H * D ? E : H * D) : (I > H * D ? I : H * D);
    float *buf = malloc(sizeof(float) * T * (E + qkv_n + H * D + E + 3 * I + E));
    /* int4_matmul's for up to MATMUL_ROWS rows, int8_matmul's for INT8_MATMUL_ROWS: 2 K bytes + 8 K / G a row, G >= 1 */
    void *scratch = malloc(10 * widest * (MATMUL_ROWS > INT8_MATMUL_ROWS ? MATMUL_ROWS : INT8_MATMUL_ROWS));
    int64_t *kept_pos = malloc(sizeof(int64_t) * (2 * (kept + 1) + n_policy)), *kept_starts = kept_pos + kept + 1;
    int64_t *policy_at = kept_starts + kept + 1;  /* each policy row's row as rows are dropped */
    char *skip = n_policy ? calloc(T, 1) : NULL;
    if (!buf || !scratch || !kept_pos || (n_policy && !skip)) {
        free(buf);
        free(scratch);
        free(kept_pos);
        free(skip);
        return -1;
    }
    for (int64_t i = 0; i < n_policy; i++)
        skip[policy_at[i] = policy_rows[i]] = 1;
    float *h = buf, *qkv = h + T * E, *attn = qkv + T * qkv_n, *proj = attn + T * H * D, *gu = proj + T * E;
    float *act = gu + T * 2 * I, *rows_in = act + T * I;
    int64_t status = 0;
    for (int64_t l = 0; l < m->num_layers && status == 0; l++) {
        const Layer *L = m->layers + l;
        const int32_t *table = pages + m->layer_group[l] * group_stride;  /* this layer's group's tables */
        #pragma omp parallel for if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; t++)
            rms_norm(x + t * E, L->attn_norm, E, m->eps, h + t * E);
        status |= linear(&L->qkv, h, T, qkv, scratch);
        #pragma omp parallel for if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; t++) {
            const int64_t slot = (int64_t)table[page_starts[t] + pos[t] / page_size] * page_size + pos[t] % page_size;
            float *q = qkv + t * qkv_n, *k = q + H * D, *v = k + Hkv * D;
            if (L->q_norm && L->qk_norm_full) {
                rms_norm(q, L->q_norm, H * D, m->eps, q);
                rms_norm(k, L->k_norm, Hkv * D, m->eps, k);
            } else if (L->q_norm) {
                for (int64_t h = 0; h < H; h++)
                    rms_norm(q + h * D, L->q_norm, D, m->eps, q + h * D);
                for (int64_t h = 0; h < Hkv; h++)
                    rms_norm(k + h * D, L->k_norm, D, m->eps, k + h * D);
            }
            const float *c = (L->local_rope ? cos_local : cos) + t * m->rotary_dim / 2;
            const float *s = (L->local_rope ? sin_local : sin) + t * m->rotary_dim / 2;
            rope(q, H, D, m->rotary_dim, c, s);
            rope(k, Hkv, D, m->rotary_dim, c, s);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t row = ((m->layer_slot[l] * Hkv + g) * m->slots + slot) * D;
                for (int64_t d = 0; d < D; d++) {
                    kv_store(m->k_cache, row + d, k[g * D + d], (int)m->kv_bf16);
                    kv_store(m->v_cache, row + d, v[g * D + d], (int)m->kv_bf16);
                }
            }
        }
        if (l == m->num_layers - 1) {
            keep_rows(keep, kept, qkv, qkv_n, x, E, pos, page_starts, kept_pos, kept_starts, skip, policy_at, n_policy);
            T = kept, pos = kept_pos, page_starts = kept_starts;
            if (T == 0)
                break;
        }
        /* a policy decides a global layer's attention of its rows; a windowed layer keeps its window */
        const int64_t by_policy = n_policy && m->windows[l] <= 0;
        status |= attend(m, l, T, qkv, qkv_n, table, page_starts, pos, page_size, by_policy ? skip : NULL, attn);
        if (by_policy && status == 0)
            status |= m->policy(l, qkv, qkv_n, attn, T, n_policy, policy_at);
        status |= linear(&L->o, attn, T, proj, scratch);
        if (m->reduce && status == 0)
            status |= m->reduce(proj, T * E);
        #pragma omp parallel for if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; t++) {
            if (L->post_attn_norm)
                rms_norm(proj + t * E, L->post_attn_norm, E, m->eps, proj + t * E);
            for (int64_t i = t * E; i < (t + 1) * E; i++)
                x[i] += proj[i];
            rms_norm(x + t * E, L->mlp_norm, E, m->eps, h + t * E);
        }
        if (L->num_experts) {
            status |= experts(L, h, T, E, x, rows_in, gu, act, proj, scratch);
            continue;
        }
        status |= linear(&L->gate_up, h, T, gu, scratch);
        #pragma omp parallel for if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; t++)  /* gate, then up */
            if (m->gelu)
                for (int64_t i = 0; i < I; i++)
                    act[t * I + i] = gelu_tanh(gu[t * 2 * I + i]) * gu[t * 2 * I + I + i];
            else
                for (int64_t i = 0; i < I; i++)
                    act[t * I + i] = gu[t * 2 * I + i] * sigmoid(gu[t * 2 * I + i]) * gu[t * 2 * I + I + i];
        status |= linear(&L->down, act, T, proj, scratch);
        if (m->reduce && status == 0)
            status |= m->reduce(proj, T * E);
        #pragma omp parallel for if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; t++) {
            if (L->post_mlp_norm)
                rms_norm(proj + t * E, L->post_mlp_norm, E, m->eps, proj + t * E);
            for (int64_t i = t * E; i < (t + 1) * E; i++)
                x[i] += proj[i];
        }
    }
    for (int64_t t = 0; t < kept && status == 0; t++)
        rms_norm(x + t * E, m->final_norm, E, m->eps, out + t * E);
    free(buf);
    free(scratch);
    free(kept_pos);
    free(skip);
    return status;
}
