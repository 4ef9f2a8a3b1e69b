/* One element of a KV cache that is float32, or bfloat16 when bf16: the load and store every
   kernel reading or writing the cache shares. */
#ifndef KVSERVE_KV_ELEMENT_H
#define KVSERVE_KV_ELEMENT_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float kv_load(const void *base, int64_t i, int bf16)
{
    return bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void kv_store(void *base, int64_t i, float f, int bf16)
{
    if (!bf16) {
        ((float *)base)[i] = f;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  /* round to nearest even, as torch's .to(bfloat16) */
    ((uint16_t *)base)[i] = (uint16_t)(bits >> 16);
}
#endif
