/* A mixture-of-experts MLP (kvserve/model/moe.py) on float32 stacked weights, every chosen expert
   of a step in one call. PyTorch's route costs ~6 ops an expert and a matmul whose few rows (a
   batch-8 decode gives an expert ~2 tokens) read the weights at ~8 GB/s where the memory gives ~20;
   here each task reads a block of ROWS weight rows once, from memory, for all the tokens that chose
   its expert (their rows stay in L1). Two phases, each split between torch's OpenMP threads:
   gate and up rows with SiLU(gate) * up, then down. Each output is one FMA chain over K in 8 lanes
   whatever the other tokens, so a token comes out bit for bit as alone.
   Twin: SparseMoE._grouped (PyTorch ops). */
#include <stdint.h>
#include <stdlib.h>

#include "paged_attention.c"  /* sum8, exp_neg */

#define ROWS 4    /* weight rows per register block */
#define TOKENS 3  /* token rows per register block: 12 accumulators + 3 token vectors + 1 weight = 16 ymm */
/* the weight rows this far ahead are asked for while a block's products run: rows are 2 KiB apart
   streams the hardware prefetcher starts late on (decode steps went from 11 to 13 GB/s) */
#define PREFETCH_ROWS 8

#ifdef __AVX2__

int64_t moe_available(void) { return 1; }

/* out[t][r] = w[r, 0..K) . x[t][0..K) for R weight rows (ldw apart) and TT token rows; R and TT are
   constants where dots() calls it, so the accumulators stay in registers */
static inline __attribute__((always_inline)) void block(const float *w, int64_t ldw, int R, const float *const *x,
                                                        int TT, int64_t K, float out[TOKENS][ROWS])
{
    __m256 acc[TOKENS][ROWS];
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < R; r++)
            acc[t][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (k % 16 == 0)  /* a cache line */
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(w + (r + PREFETCH_ROWS) * ldw + k), _MM_HINT_T0);
        __m256 xv[TOKENS];
        for (int t = 0; t < TT; t++)
            xv[t] = _mm256_loadu_ps(x[t] + k);
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_loadu_ps(w + r * ldw + k);
            for (int t = 0; t < TT; t++)
                acc[t][r] = _mm256_fmadd_ps(wv, xv[t], acc[t][r]);
        }
    }
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < R; r++) {
            float s = sum8(acc[t][r]);
            for (int64_t j = k; j < K; j++)
                s += w[r * ldw + j] * x[t][j];
            out[t][r] = s;
        }
}

static void dots(const float *w, int64_t ldw, int64_t R, const float *const *x, int64_t TT, int64_t K,
                 float out[TOKENS][ROWS])
{
    if (R == ROWS && TT == 3)
        block(w, ldw, ROWS, x, 3, K, out);
    else if (R == ROWS && TT == 2)
        block(w, ldw, ROWS, x, 2, K, out);
    else if (R == ROWS)
        block(w, ldw, ROWS, x, 1, K, out);
    else  /* the last rows of a width not a multiple of ROWS */
        block(w, ldw, (int)R, x, (int)TT, K, out);
}

static inline float silu(float g)
{
    const float e = exp_neg(-fabsf(g));
    return g * (g >= 0 ? 1.0f : e) / (1 + e);
}

/* x [T, H] rows, each routed to experts[t * K + j] (j < K) -> out [T * K, H]: pair (t, j)'s expert
   output, unweighted. gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]. Returns 0, or
   -1 when out of memory. */
int64_t moe_pairs(const float *x, int64_t T, int64_t H, const int64_t *experts, int64_t K, const float *gate_up,
                  const float *down, int64_t E, int64_t I, float *out)
{
    const int64_t P = T * K;
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *pair = malloc(sizeof(int64_t) * P),
            *active = malloc(sizeof(int64_t) * E);
    const float **xrows = malloc(sizeof(float *) * 2 * P), **arows = xrows + P;
    float *act = malloc(sizeof(float) * P * I);
    if (!start || !pair || !active || !xrows || !act) {
        free(start), free(pair), free(active), free(xrows), free(act);
        return -1;
    }
    /* the pairs sorted by expert (counting sort, stable): expert e's are start[e]..start[e + 1) */
    for (int64_t p = 0; p < P; p++)
        start[experts[p] + 1]++;
    int64_t used = 0;
    for (int64_t e = 0; e < E; e++) {
        if (start[e + 1])
            active[used++] = e;
        start[e + 1] += start[e];
    }
    int64_t *fill = malloc(sizeof(int64_t) * E);
    if (!fill) {
        free(start), free(pair), free(active), free(xrows), free(act);
        return -1;
    }
    memcpy(fill, start, sizeof(int64_t) * E);
    for (int64_t p = 0; p < P; p++) {
        const int64_t s = fill[experts[p]]++;
        pair[s] = p;
        xrows[s] = x + (p / K) * H;
        arows[s] = act + s * I;
    }
    free(fill);
    const int64_t gate_blocks = (I + ROWS - 1) / ROWS, down_blocks = (H + ROWS - 1) / ROWS;
    /* one thread where the whole step is a few microseconds of products (tiny test models) */
    #pragma omp parallel if (used * I * H >= (1 << 16))
    {
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < used * gate_blocks; task++) {
            const int64_t e = active[task / gate_blocks], i0 = task % gate_blocks * ROWS;
            const int64_t R = I - i0 < ROWS ? I - i0 : ROWS;
            const float *wg = gate_up + (e * 2 * I + i0) * H, *wu = wg + I * H;
            for (int64_t s = start[e]; s < start[e + 1]; s += TOKENS) {
                const int64_t TT = start[e + 1] - s < TOKENS ? start[e + 1] - s : TOKENS;
                float g[TOKENS][ROWS], u[TOKENS][ROWS];
                dots(wg, H, R, xrows + s, TT, H, g);
                dots(wu, H, R, xrows + s, TT, H, u);
                for (int64_t t = 0; t < TT; t++)
                    for (int64_t r = 0; r < R; r++)
                        act[(s + t) * I + i0 + r] = silu(g[t][r]) * u[t][r];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < used * down_blocks; task++) {
            const int64_t e = active[task / down_blocks], h0 = task % down_blocks * ROWS;
            const int64_t R = H - h0 < ROWS ? H - h0 : ROWS;
            const float *wd = down + (e * H + h0) * I;
            for (int64_t s = start[e]; s < start[e + 1]; s += TOKENS) {
                const int64_t TT = start[e + 1] - s < TOKENS ? start[e + 1] - s : TOKENS;
                float y[TOKENS][ROWS];
                dots(wd, I, R, arows + s, TT, I, y);
                for (int64_t t = 0; t < TT; t++)
                    for (int64_t r = 0; r < R; r++)
                        out[pair[s + t] * H + h0 + r] = y[t][r];
            }
        }
    }
    free(start), free(pair), free(active), free(xrows), free(act);
    return 0;
}

#else

int64_t moe_available(void) { return 0; }  /* callers keep the PyTorch ops */

int64_t moe_pairs(const float *x, int64_t T, int64_t H, const int64_t *experts, int64_t K, const float *gate_up,
                  const float *down, int64_t E, int64_t I, float *out)
{
    return -1;
}

#endif
