/* Structured outputs: a grammar's token bitmask applied to a step's logits, -inf where a token is
   not allowed. xgrammar's own CPU kernel tests every bit; a grammar allows few tokens at most
   positions, so here a word of 32 disallowed tokens is 32 plain stores and an all-allowed one is
   skipped. Plain C with no threads: it also runs where a torch op would start an OpenMP team
   beside the forward's. Twin: xgrammar.apply_token_bitmask_inplace (kvserve/engine/structured.py). */
#include <math.h>
#include <stdint.h>

/* For each i: logits row rows[i] (stride floats apart) masked by bitmask row mask_rows[i] (words
   ints apart; bit t of word t / 32 set: token t allowed), tokens [0, vocab). Where and_mask is
   given and also[i] is set, a token must be allowed by and_mask (one row of words) as well. */
void apply_token_bitmask(float *logits, int64_t stride, const int32_t *bitmask, int64_t words,
                         const int64_t *rows, const int64_t *mask_rows, const int32_t *and_mask,
                         const uint8_t *also, int64_t num_rows, int64_t vocab)
{
    int64_t full = vocab / 32;
    for (int64_t i = 0; i < num_rows; i++) {
        float *row = logits + rows[i] * stride;
        const uint32_t *bits = (const uint32_t *)(bitmask + mask_rows[i] * words);
        const uint32_t *extra = and_mask != 0 && also[i] ? (const uint32_t *)and_mask : 0;
        for (int64_t w = 0; w <= full && 32 * w < vocab; w++) {
            uint32_t word = extra ? bits[w] & extra[w] : bits[w];
            int n = w < full ? 32 : (int)(vocab - 32 * w);
            float *x = row + 32 * w;
            if (word == 0xFFFFFFFFu && n == 32)
                continue;
            if (word == 0) {
                for (int j = 0; j < n; j++)
                    x[j] = -INFINITY;
                continue;
            }
            for (int j = 0; j < n; j++)
                x[j] = (word >> j) & 1u ? x[j] : -INFINITY;
        }
    }
}
