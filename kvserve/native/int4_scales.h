/* The int4 weights' bf16 (scale, zero) pairs (PyTorch's _convert_weight_to_int4pack_for_cpu
   convention, w = (q - 8) * scale + zero) as AVX2 floats: what qmatmul.c and gemm.c both read. */
#ifndef KVSERVE_INT4_SCALES_H
#define KVSERVE_INT4_SCALES_H
#ifdef __AVX2__
#include <immintrin.h>
#include <stdint.h>

/* 8 rows' float (scale, zero') from their bf16 (scale, zero) pairs: zero' = zero - 8 * scale, the
   value at q = 0 */
static inline void load_scales(const uint16_t *pairs, __m256 *scale, __m256 *zero0)
{
    const __m256i v = _mm256_loadu_si256((const __m256i *)pairs);
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
    *zero0 = _mm256_fnmadd_ps(_mm256_set1_ps(8), *scale, zero);
}
#endif
#endif
