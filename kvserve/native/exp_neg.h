/* e^x for x <= 0: the softmax and activation kernels' exponential. */
#ifndef KVSERVE_EXP_NEG_H
#define KVSERVE_EXP_NEG_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (softmax terms), relative error ~2e-7: branch-free, so loops over it vectorize,
   where libm's expf is a call per element */
static inline float exp_neg(float x)
{
    x = x > -87.0f ? x : -87.0f;  /* not fmaxf: a libm call, which stops vectorization */
    const float n = nearbyintf(x * 1.44269504f);
    const float r = x - n * 0.693145752f - n * 1.42860677e-06f;  /* ln 2 in two parts */
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#endif
