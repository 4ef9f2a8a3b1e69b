/* A decode token (or a few prompt tokens) of one sequence of a Llama-family model with int4 weights,
   all layers in one call: the eager PyTorch step spends two thirds of its time dispatching ~15
   small ops a layer, not in matmuls.
   Same math as kvserve/model/llama.py (rotate-half RoPE, GQA, SiLU-gated MLP) in float32, with
   the int4 matmuls of qmatmul.c; K/V go to the paged cache like TorchRefAttention's. */
#include <stdlib.h>

/* one translation unit: the kernels inline here; native.load hashes every source */
#include "paged_attention.c"
#include "qmatmul.c"

typedef struct {
    const uint8_t *w;       /* _convert_weight_to_int4pack_for_cpu layout */
    const uint16_t *scales; /* [K / G, N, 2] bf16 (scale, zero) */
    const float *bias;      /* [N] or NULL */
    int64_t n, k, group, block;
} Linear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    Linear qkv, o, gate_up, down;
} Layer;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    int64_t kv_bf16;          /* cache dtype: bfloat16, else float32 */
    int64_t slots;            /* num_pages * page_size */
    void *k_cache, *v_cache;  /* [layers, kv_heads, slots, head_dim] */
    const Layer *layers;
    const float *final_norm;
} Model;

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out)
{
    float ss = 0;
    for (int64_t i = 0; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1 / sqrtf(ss / n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * r * w[i];
}

static void linear(const Linear *l, const float *x, int64_t M, float *y, void *scratch)
{
    int4_matmul(x, M, l->w, l->scales, l->n, l->k, l->group, l->block, y, scratch);
    if (l->bias)
        for (int64_t i = 0; i < M * l->n; i++)
            y[i] += l->bias[i % l->n];
}

/* x [heads, D] rotated in place by the position's cos/sin [D / 2] */
static void rope(float *x, int64_t heads, int64_t D, const float *cos, const float *sin)
{
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/* q [H, D] against the layer's cache rows of positions 0..n-1 -> out [H, D]; scores: H * n floats */
static void attend(const Model *m, int64_t layer, const float *q, const int32_t *pages, int64_t page_size,
                   int64_t n, float *scores, float *out)
{
    const int64_t D = m->head_dim, group = m->heads / m->kv_heads;
    const int64_t offset = layer * m->kv_heads * m->slots * D * (m->kv_bf16 ? 2 : 4);
    const char *k = (const char *)m->k_cache + offset, *v = (const char *)m->v_cache + offset;
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < m->kv_heads; g++)
        attend_kv_head(q + g * group * D, k, v, (int)m->kv_bf16, m->slots, g, group, D, m->scale, pages,
                       page_size, n, scores + g * group * n, out + g * group * D);
}

/* T consecutive tokens of one sequence (a decode token, or a short prompt chunk). x [T, hidden]:
   their embeddings, overwritten by the residual stream; out [T, hidden]: the final normed hidden
   states. cos/sin [T, D / 2]: their positions, kv_len - T .. kv_len - 1; pages: the sequence's page
   table. Returns 0, or -1 when out of memory. */
int64_t decode_step(const Model *m, float *x, int64_t T, const float *cos, const float *sin, const int32_t *pages,
                    int64_t page_size, int64_t kv_len, float *out)
{
    const int64_t H = m->heads, Hkv = m->kv_heads, D = m->head_dim, I = m->intermediate, E = m->hidden;
    const int64_t qkv_n = (H + 2 * Hkv) * D, widest = E > I ? (E > H * D ? E : H * D) : (I > H * D ? I : H * D);
    float *buf = malloc(sizeof(float) * (T * (E + qkv_n + H * D + E + 3 * I) + H * kv_len));
    void *scratch = malloc(10 * T * widest);  /* int4_matmul's: 2 M K bytes + 8 M K / G, G >= 1 */
    if (!buf || !scratch) {
        free(buf);
        free(scratch);
        return -1;
    }
    float *h = buf, *qkv = h + T * E, *attn = qkv + T * qkv_n, *proj = attn + T * H * D, *gu = proj + T * E;
    float *act = gu + T * 2 * I, *scores = act + T * I;
    for (int64_t l = 0; l < m->num_layers; l++) {
        const Layer *L = m->layers + l;
        for (int64_t t = 0; t < T; t++)
            rms_norm(x + t * E, L->attn_norm, E, m->eps, h + t * E);
        linear(&L->qkv, h, T, qkv, scratch);
        for (int64_t t = 0; t < T; t++) {  /* token t: position kv_len - T + t, causal */
            const int64_t pos = kv_len - T + t, slot = (int64_t)pages[pos / page_size] * page_size + pos % page_size;
            float *q = qkv + t * qkv_n, *k = q + H * D, *v = k + Hkv * D;
            rope(q, H, D, cos + t * D / 2, sin + t * D / 2);
            rope(k, Hkv, D, cos + t * D / 2, sin + t * D / 2);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t row = ((l * Hkv + g) * m->slots + slot) * D;
                for (int64_t d = 0; d < D; d++) {
                    kv_store(m->k_cache, row + d, k[g * D + d], (int)m->kv_bf16);
                    kv_store(m->v_cache, row + d, v[g * D + d], (int)m->kv_bf16);
                }
            }
            attend(m, l, q, pages, page_size, pos + 1, scores, attn + t * H * D);
        }
        linear(&L->o, attn, T, proj, scratch);
        for (int64_t i = 0; i < T * E; i++)
            x[i] += proj[i];
        for (int64_t t = 0; t < T; t++)
            rms_norm(x + t * E, L->mlp_norm, E, m->eps, h + t * E);
        linear(&L->gate_up, h, T, gu, scratch);
        for (int64_t t = 0; t < T; t++)  /* gate, then up */
            for (int64_t i = 0; i < I; i++)
                act[t * I + i] = gu[t * 2 * I + i] / (1 + expf(-gu[t * 2 * I + i])) * gu[t * 2 * I + I + i];
        linear(&L->down, act, T, proj, scratch);
        for (int64_t i = 0; i < T * E; i++)
            x[i] += proj[i];
    }
    for (int64_t t = 0; t < T; t++)
        rms_norm(x + t * E, m->final_norm, E, m->eps, out + t * E);
    free(buf);
    free(scratch);
    return 0;
}
