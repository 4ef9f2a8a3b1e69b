/* Structured outputs: a grammar's token bitmask applied to a step's logits, -inf where a token is
   not allowed. xgrammar's own CPU kernel tests every bit; a grammar allows few tokens at most
   positions, so here a word of 32 disallowed tokens is 32 plain stores and an all-allowed one is
   skipped. Twin: xgrammar.apply_token_bitmask_inplace (kvserve/engine/structured.py). */
#include <math.h>
#include <stdint.h>

/* For each i: logits row rows[i] (stride floats apart) masked by bitmask row rows[i] (words ints
   apart; bit t of word t / 32 set: token t allowed), tokens [0, vocab). */
void apply_token_bitmask(float *logits, int64_t stride, const int32_t *bitmask, int64_t words,
                         const int64_t *rows, int64_t num_rows, int64_t vocab)
{
    for (int64_t i = 0; i < num_rows; i++) {
        float *row = logits + rows[i] * stride;
        const uint32_t *bits = (const uint32_t *)(bitmask + rows[i] * words);
        int64_t full = vocab / 32;
        for (int64_t w = 0; w < full; w++) {
            uint32_t word = bits[w];
            float *x = row + 32 * w;
            if (word == 0xFFFFFFFFu)
                continue;
            if (word == 0) {
                for (int j = 0; j < 32; j++)
                    x[j] = -INFINITY;
                continue;
            }
            for (int j = 0; j < 32; j++)
                x[j] = (word >> j) & 1u ? x[j] : -INFINITY;
        }
        for (int64_t t = 32 * full; t < vocab; t++)
            if (!((bits[t / 32] >> (t % 32)) & 1u))
                row[t] = -INFINITY;
    }
}
