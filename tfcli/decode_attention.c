/* The attention of tfcli's cached decode step: one new position per sequence, over a KV ring.
 *
 * Why C: a 16-sample step of the 10.7M model streams 75 MB of float32 keys and values from
 * memory, and PyTorch's CPU kernels either do not read 16-bit keys any faster (bmm) or are
 * built for many queries (scaled_dot_product_attention). This reads float16 keys and values
 * (half the bytes) and accumulates in float32. It also does the step's small per-head work
 * (QK-norm, rotary positions, storing the new key and value), which in PyTorch is a dozen
 * kernel launches a layer: most of a small model's step. Compiled on first use by
 * tfcli/native.py, and called from decode_matmul.c's decode_step (tfcli/native_decoder.py) or
 * layer by layer from PyTorch's step (tfcli/decode_attention.py); PyTorch's own attention remains
 * the fallback wherever it cannot be built.
 *
 * Layout, in elements: qkv is the (B, 3, H, D) float32 output of the layer's qkv projection;
 * cos and sin are the position's rows of the rotary tables (D each). The ring holds sequence
 * b's head h's keys at ring + b*rb + h*rh + t*D and its values rkv further on. The new key and
 * value go to slot *slot, then slots [0, n) are attended to. out is (B, H, D) float32,
 * contiguous. Integers are int64, as PyTorch's are. Threads: OpenMP's where tfcli/native.py builds
 * with it (where PyTorch's wheel carries GNU's libgomp, so that the two share one pool), else one.
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* float16 storage: the compiler's _Float16 (GCC 12+, clang 15+), else F16C's conversions (older
 * compilers on x86), else a bit-exact conversion in software (slow, but correct). */
#if defined(__FLT16_MAX__) && !defined(TFCLI_NO_FLOAT16)
typedef _Float16 half;
static inline float half_to_float(half h) { return (float)h; }
static inline half float_to_half(float f) { return (half)f; }
#elif defined(__F16C__)
typedef unsigned short half;
static inline float half_to_float(half h) { return _cvtsh_ss(h); }
static inline half float_to_half(float f) { return _cvtss_sh(f, 0); }
#else
#include <string.h>
typedef unsigned short half;
static inline float half_to_float(half h) {
    unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);          /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);      /* normal */
    else if (!man) bits = sign;                                         /* zero */
    else {                                                              /* subnormal */
        float f = (float)man * 5.9604644775390625e-8f;                  /* man * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline half float_to_half(float f) {
    unsigned bits;
    memcpy(&bits, &f, 4);
    unsigned sign = (bits >> 16) & 0x8000u, a = bits & 0x7fffffffu;
    if (a >= 0x7f800000u) return (half)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
    if (a >= 0x477ff000u) return (half)(sign | 0x7c00u);                /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                              /* subnormal or zero */
        float m;
        memcpy(&m, &a, 4);
        return (half)(sign | (unsigned)lrintf(m * 16777216.f));         /* m / 2^-24, to nearest even */
    }
    a += 0xfffu + ((a >> 13) & 1u) - (112u << 23);                      /* round to nearest even */
    return (half)(sign | (a >> 13));
}
#endif

static inline float load_f32(const float *p) { return *p; }
static inline float load_f16(const half *p) { return half_to_float(*p); }
static inline float store_f32(float x) { return x; }
static inline half store_f16(float x) { return float_to_half(x); }

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_f16(const half *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline void vstore(float *p, vec x) { _mm512_storeu_ps(p, x); }
static inline float vsum(vec x) { return _mm512_reduce_add_ps(x); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vround(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) { /* 2^n for integral n in [-126, 127]: n + 127 as the exponent's bits */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
static inline vec vload_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_f16(const half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline void vstore(float *p, vec x) { _mm256_storeu_ps(p, x); }
static inline float vsum(vec x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vround(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

#ifdef LANES
/* e^x for x <= 0 (softmax's x - max), to ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
 * Taylor series to r^7 / 7! (the next term is below float's precision there), times 2^n. Below
 * -87, where e^x leaves float's normal range, it returns e^-87: nothing next to the max's 1. */
static inline vec vexp(vec x) {
    x = vmax(vset(-87.f), x); /* (max returns its second operand for NaN: a NaN score stays NaN) */
    vec n = vround(vmul(x, vset(1.44269504088896341f)));
    vec r = vfma(n, vset(-0.693145751953125f), x);       /* ln2 in two parts: the first is exact in float, */
    r = vfma(n, vset(-1.42860682030941723e-6f), r);       /* so n ln2 is subtracted to float's precision */
    vec p = vset(1.f / 5040);
    p = vfma(p, r, vset(1.f / 720));
    p = vfma(p, r, vset(1.f / 120));
    p = vfma(p, r, vset(1.f / 24));
    p = vfma(p, r, vset(1.f / 6));
    p = vfma(p, r, vset(0.5f));
    p = vfma(p, r, vset(1.f));
    p = vfma(p, r, vset(1.f));
    return vmul(p, vpow2(n));
}
#endif

/* dot(q, k) and acc += p * v over D elements, for a ring of element type T. */
#ifdef LANES
#define ROW_OPS(T)                                                                              \
    static inline float dot_##T(const float *q, const T *k, int64_t D) {                           \
        vec a = vzero();                                                                        \
        int64_t d = 0;                                                                             \
        for (; d + LANES <= D; d += LANES) a = vfma(vload_f32(q + d), vload_##T(k + d), a);     \
        float s = vsum(a);                                                                      \
        for (; d < D; d++) s += q[d] * load_##T(k + d);                                         \
        return s;                                                                               \
    }                                                                                           \
    static inline void axpy_##T(float *acc, float p, const T *v, int64_t D) {                      \
        vec pp = vset(p);                                                                       \
        int64_t d = 0;                                                                             \
        for (; d + LANES <= D; d += LANES) vstore(acc + d, vfma(pp, vload_##T(v + d), vload_f32(acc + d))); \
        for (; d < D; d++) acc[d] += p * load_##T(v + d);                                       \
    }
#else
#define ROW_OPS(T)                                                                              \
    static inline float dot_##T(const float *q, const T *k, int64_t D) {                           \
        float s = 0.f;                                                                          \
        for (int64_t d = 0; d < D; d++) s += q[d] * load_##T(k + d);                               \
        return s;                                                                               \
    }                                                                                           \
    static inline void axpy_##T(float *acc, float p, const T *v, int64_t D) {                      \
        for (int64_t d = 0; d < D; d++) acc[d] += p * load_##T(v + d);                             \
    }
#endif

typedef float f32;
typedef half f16;
ROW_OPS(f32)
ROW_OPS(f16)

/* q or k of one head, RMS-normalised to unit length and rotated to its position: the cached
 * step's `rotate(unit(x), cos, sin)`, whose tables are cos|cos and -sin|sin. */
static inline void unit_rotate(const float *x, const float *cos, const float *sin, float *out, int64_t D) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
    float norm = sqrtf(ss), inv = 1.f / (norm > 1e-30f ? norm : 1e-30f);
    for (int64_t d = 0; d < D; d++) out[d] = (x[d] * cos[d] + x[(d + D / 2) % D] * sin[d]) * inv;
}

#define BLOCK 256 /* slots scored at a time: the scores live on the stack, whatever the context */

/* out = the values' average over slots [0, n), weighted by softmax(q . key), for a q already
 * scaled: scores a block at a time, softmax online (rescaling what earlier blocks added up). */
#define ATTEND_ANY(T)                                                                           \
    static void attend_any_##T(const float *q, const T *keys, const T *values, int64_t n,       \
                               int64_t D, float *out) {                                         \
        float acc[D], score[BLOCK], top = -INFINITY, sum = 0.f;                                 \
        for (int64_t d = 0; d < D; d++) acc[d] = 0.f;                                           \
        for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {                                             \
            int64_t m = n - t0 < BLOCK ? n - t0 : BLOCK;                                        \
            float block_top = -INFINITY;                                                        \
            for (int64_t t = 0; t < m; t++) {                                                   \
                score[t] = dot_##T(q, keys + (t0 + t) * D, D);                                  \
                block_top = score[t] > block_top ? score[t] : block_top;                        \
            }                                                                                   \
            if (block_top > top) {                                                              \
                float r = expf(top - block_top);                                                \
                for (int64_t d = 0; d < D; d++) acc[d] *= r;                                    \
                sum *= r;                                                                       \
                top = block_top;                                                                \
            }                                                                                   \
            for (int64_t t = 0; t < m; t++) {                                                   \
                float p = expf(score[t] - top);                                                 \
                sum += p;                                                                       \
                axpy_##T(acc, p, values + (t0 + t) * D, D);                                     \
            }                                                                                   \
        }                                                                                       \
        for (int64_t d = 0; d < D; d++) out[d] = acc[d] / sum;                                  \
    }

#ifdef LANES
/* The same for D = NV vectors (NV <= 8, a constant once inlined): q and the running sum stay in
 * registers (attend_any stores and reloads the sum for every slot), exponentials are taken a
 * vector at a time. A 16-sample step's attention at D = 64, 256 slots: 0.29 vs 0.38 ms for the
 * 3.2M shape's 4 layers, 0.75 vs 0.93 ms for the 10.7M shape's 6; near the speed keys and values
 * stream from cache and memory. */
#define ATTEND_REGS(T)                                                                          \
    static inline __attribute__((always_inline)) void attend_regs_##T(                          \
            const float *q, const T *keys, const T *values, int64_t n, float *out, const int NV) { \
        const int64_t D = (int64_t)NV * LANES;                                                  \
        vec qv[8], acc[8];                                                                      \
        float score[BLOCK] __attribute__((aligned(64))), top = -INFINITY, sum = 0.f;            \
        for (int j = 0; j < NV; j++) qv[j] = vload_f32(q + j * LANES), acc[j] = vzero();        \
        for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {                                             \
            int64_t m = n - t0 < BLOCK ? n - t0 : BLOCK, t;                                     \
            const T *k = keys + t0 * D, *v = values + t0 * D;                                   \
            float block_top = -INFINITY;                                                        \
            for (t = 0; t < m; t++, k += D) {                                                   \
                vec a = vmul(qv[0], vload_##T(k));                                              \
                for (int j = 1; j < NV; j++) a = vfma(qv[j], vload_##T(k + j * LANES), a);      \
                score[t] = vsum(a);                                                             \
                block_top = score[t] > block_top ? score[t] : block_top;                        \
            }                                                                                   \
            if (block_top > top) {                                                              \
                float r = expf(top - block_top);                                                \
                for (int j = 0; j < NV; j++) acc[j] = vmul(acc[j], vset(r));                    \
                sum *= r;                                                                       \
                top = block_top;                                                                \
            }                                                                                   \
            vec total = vzero(), shift = vset(-top);                                            \
            for (t = 0; t + LANES <= m; t += LANES) {                                           \
                vec p = vexp(vadd(vload_f32(score + t), shift));                                \
                vstore(score + t, p);                                                           \
                total = vadd(total, p);                                                         \
            }                                                                                   \
            for (sum += vsum(total); t < m; t++) sum += score[t] = expf(score[t] - top);        \
            for (t = 0; t < m; t++, v += D) {                                                   \
                vec p = vset(score[t]);                                                         \
                for (int j = 0; j < NV; j++) acc[j] = vfma(p, vload_##T(v + j * LANES), acc[j]); \
            }                                                                                   \
        }                                                                                       \
        for (int j = 0; j < NV; j++) vstore(out + j * LANES, vmul(acc[j], vset(1.f / sum)));    \
    }
#define ATTEND_FIXED(T, NV) case NV: attend_regs_##T(q, keys, values, n, out, NV); return;
#define ATTEND_DISPATCH(T)                                                                      \
    switch (D % LANES ? 0 : D / LANES) {                                                        \
        ATTEND_FIXED(T, 1) ATTEND_FIXED(T, 2) ATTEND_FIXED(T, 3) ATTEND_FIXED(T, 4)             \
        ATTEND_FIXED(T, 5) ATTEND_FIXED(T, 6) ATTEND_FIXED(T, 7) ATTEND_FIXED(T, 8)             \
    }
#else
#define ATTEND_REGS(T)
#define ATTEND_DISPATCH(T)
#endif

#define ATTEND(T)                                                                               \
    ATTEND_ANY(T)                                                                               \
    ATTEND_REGS(T)                                                                              \
    static void attend_##T(const float *q, const T *keys, const T *values, int64_t n, int64_t D, \
                           float *out) {                                                        \
        ATTEND_DISPATCH(T)                                                                      \
        attend_any_##T(q, keys, values, n, D, out);                                             \
    }

#define STEP(T)                                                                                 \
    ATTEND(T)                                                                                   \
    void step_##T(const float *qkv, const float *cos, const float *sin, T *ring, int64_t rkv,   \
                  int64_t rb, int64_t rh, const int64_t *slot, int64_t n, int64_t B, int64_t H, \
                  int64_t D, float scale, float *out, int threads) {                            \
        (void)threads; /* read by the pragma only when compiled with OpenMP */                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                       \
        for (int64_t i = 0; i < B * H; i++) {                                                   \
            int64_t b = i / H, h = i % H, C = H * D;                                            \
            const float *x = qkv + b * 3 * C + h * D;                                           \
            T *keys = ring + b * rb + h * rh, *values = keys + rkv;                             \
            float q[D], k[D];                                                                   \
            unit_rotate(x, cos, sin, q, D);                                                     \
            unit_rotate(x + C, cos, sin, k, D);                                                 \
            for (int64_t d = 0; d < D; d++) {                                                   \
                keys[*slot * D + d] = store_##T(k[d]);                                          \
                values[*slot * D + d] = store_##T(x[2 * C + d]);                                \
                q[d] *= scale;                                                                  \
            }                                                                                   \
            attend_##T(q, keys, values, n, D, out + i * D);                                     \
        }                                                                                       \
    }

STEP(f32)
STEP(f16)
