/* The matmuls of tfcli's cached steps on a CPU: y = add + x W^T, x float32 (M, K), W half.
 *
 * Why C: a decode step multiplies one row (or 16, for a batch of samples) by each weight
 * matrix. PyTorch's CPU kernels for so few rows read float16 weights at a third of the speed
 * the cache delivers them (one row of the 3.2M model: 0.32 ms for its 17 matrices, against 0.09
 * here) and, through oneDNN, ran 16 bfloat16 rows at 40% of this CPU's bfloat16 peak. Two
 * kernels, each on a layout made once per cache by tfcli/decode_matmul.py:
 *
 *   matmul_f16:  float16 weights (Nb, K, 16), 16 output columns per block, converted to float32
 *                and multiplied by float32 x: for one or two rows (single samples), where the
 *                weights' bytes set the speed, and float16 keeps three more bits than bfloat16.
 *                AVX-512, or AVX2 with F16C and FMA.
 *   matmul_bf16: bfloat16 weights (Nb, K/2, 16, 2), pairs of k per column as AVX512_BF16's dot
 *                product reads them; x is rounded to bfloat16 (as oneDNN's bfloat16 matmul does)
 *                and products are summed in float32: for batches, where the arithmetic sets it.
 *
 * `features()` says which were compiled in; tfcli/decode_matmul.py uses only those. Columns past
 * N in the last block are zero weights and are not stored. `flags` fold in what surrounds a
 * matmul in the step: UNIT takes rows of x at unit length (RMSNorm: three PyTorch kernels),
 * RELU2 squares the positive part of the product (the MLP's activation: two). Threads: OpenMP over
 * blocks of columns, where tfcli/native.py builds with it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#define HAVE_F16 1
#endif

int features(void) {
    int f = 0;
#if defined(HAVE_F16)
    f |= 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    f |= 2;
#endif
    return f;
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define UNIT 1  /* flags: rows of x taken at unit length (the RMSNorm before qkv, the MLP and the head) */
#define RELU2 2 /* flags: relu(y)^2, the MLP's activation */

#if defined(HAVE_F16)
#if defined(__AVX512F__)
#define VECS 1 /* vectors per block of 16 columns */
typedef __m512 vec;
ALWAYS_INLINE vec vzero(void) { return _mm512_setzero_ps(); }
ALWAYS_INLINE vec vset(float x) { return _mm512_set1_ps(x); }
ALWAYS_INLINE vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
ALWAYS_INLINE vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
ALWAYS_INLINE vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
ALWAYS_INLINE vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
ALWAYS_INLINE vec vload(const float *p) { return _mm512_loadu_ps(p); }
ALWAYS_INLINE void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
ALWAYS_INLINE vec vload_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#else
#define VECS 2
typedef __m256 vec;
ALWAYS_INLINE vec vzero(void) { return _mm256_setzero_ps(); }
ALWAYS_INLINE vec vset(float x) { return _mm256_set1_ps(x); }
ALWAYS_INLINE vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
ALWAYS_INLINE vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
ALWAYS_INLINE vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
ALWAYS_INLINE vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
ALWAYS_INLINE vec vload(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS_INLINE void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
ALWAYS_INLINE vec vload_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
#define LANES (16 / VECS)

/* With UNIT, each row of x is divided by its length (RMSNorm without its sqrt(K), which the
 * weights carry): applied to the row's products, so x itself is read as it is. */
static void row_scales(const float *x, int64_t M, int64_t K, int unit, float *scale) {
    for (int64_t r = 0; r < M; r++) {
        const float *xr = x + r * K;
        vec a = vzero();
        int64_t k = 0;
        for (; unit && k + LANES <= K; k += LANES) a = vfma(vload(xr + k), vload(xr + k), a);
        float buf[LANES], ss = 0.f;
        vstore(buf, a);
        for (int v = 0; v < LANES; v++) ss += buf[v];
        for (; unit && k < K; k++) ss += xr[k] * xr[k];
        scale[r] = unit ? 1.f / fmaxf(sqrtf(ss), 1e-30f) : 1.f;
    }
}

/* y[0:cols] = add + f(scale * the block's 16 sums, in VECS vectors), f = relu^2 with RELU2 (the
 * MLP's activation), else none; the last block of a matrix whose N is not a multiple of 16 goes
 * through a buffer, so nothing past N is read or written. */
ALWAYS_INLINE void finish(const vec *a, float scale, int flags, const float *add, float *y, int64_t cols) {
    float buf[16];
    for (int v = 0; v < VECS; v++) {
        vec t = vmul(a[v], vset(scale));
        if (flags & RELU2) {
            t = vmax(t, vzero());
            t = vmul(t, t);
        }
        vstore(buf + v * LANES, t);
    }
    if (cols >= 16) {
        for (int v = 0; v < VECS; v++)
            vstore(y + v * LANES, add ? vadd(vload(buf + v * LANES), vload(add + v * LANES)) : vload(buf + v * LANES));
        return;
    }
    for (int64_t c = 0; c < cols; c++) y[c] = add ? buf[c] + add[c] : buf[c];
}

/* MR rows (a constant once inlined) by one block of 16 columns; S independent sums per row over
 * alternating k, so that at least four chains of multiply-adds are in flight. */
ALWAYS_INLINE void tile_f16(const float *x, const uint16_t *w, const float *scale, int flags, const float *add,
                            float *y, int64_t N, int64_t K, int64_t cols, const int MR, const int S) {
    vec acc[4][4][VECS];
    for (int r = 0; r < MR; r++)
        for (int s = 0; s < S; s++)
            for (int v = 0; v < VECS; v++) acc[r][s][v] = vzero();
    int64_t k = 0;
    for (; k + S <= K; k += S)
        for (int s = 0; s < S; s++)
            for (int v = 0; v < VECS; v++) {
                vec wv = vload_f16(w + (k + s) * 16 + v * LANES);
                for (int r = 0; r < MR; r++) acc[r][s][v] = vfma(vset(x[r * K + k + s]), wv, acc[r][s][v]);
            }
    for (; k < K; k++)
        for (int v = 0; v < VECS; v++) {
            vec wv = vload_f16(w + k * 16 + v * LANES);
            for (int r = 0; r < MR; r++) acc[r][0][v] = vfma(vset(x[r * K + k]), wv, acc[r][0][v]);
        }
    for (int r = 0; r < MR; r++) {
        for (int s = 1; s < S; s++)
            for (int v = 0; v < VECS; v++) acc[r][0][v] = vadd(acc[r][0][v], acc[r][s][v]);
        finish(acc[r][0], scale[r], flags, add ? add + r * N : 0, y + r * N, cols);
    }
}

/* 0, or -1 when there was no memory for the rows' scales (y is then not written). */
int matmul_f16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
               int flags, int threads) {
    int64_t blocks = (N + 15) / 16;
    float *scale = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!scale) return -1;
    row_scales(x, M, K, flags & UNIT, scale);
    (void)threads; /* read by the pragma only when compiled with OpenMP */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < blocks; j++) {
        const uint16_t *wj = w + j * K * 16;
        int64_t cols = N - j * 16;
        for (int64_t r = 0; r < M; r += 4) {
            const float *xr = x + r * K, *ar = add ? add + r * N + j * 16 : 0;
            float *yr = y + r * N + j * 16;
            switch (M - r < 4 ? M - r : 4) {
                case 1: tile_f16(xr, wj, scale + r, flags, ar, yr, N, K, cols, 1, 4); break;
                case 2: tile_f16(xr, wj, scale + r, flags, ar, yr, N, K, cols, 2, 2); break;
                case 3: tile_f16(xr, wj, scale + r, flags, ar, yr, N, K, cols, 3, 1); break;
                default: tile_f16(xr, wj, scale + r, flags, ar, yr, N, K, cols, 4, 1); break;
            }
        }
    }
    free(scale);
    return 0;
}
#else
int matmul_f16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
               int flags, int threads) {
    (void)x, (void)w, (void)add, (void)y, (void)M, (void)N, (void)K, (void)flags, (void)threads; /* features(): 0 */
    return -1;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ROWS 16 /* rows of x a pass: 16 sums in registers, each column block's weights read once */

ALWAYS_INLINE void tile_bf16(const uint32_t *xb, const __m512bh *w, const float *scale, int flags, const float *add,
                             float *y, int64_t N, int64_t K2, int64_t cols, const int MR, const int S) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < MR; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + S <= K2; p += S)
        for (int s = 0; s < S; s++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + p + s)); /* (no alignment assumed) */
            for (int r = 0; r < MR; r++)
                acc[r][s] = _mm512_dpbf16_ps(acc[r][s], (__m512bh)_mm512_set1_epi32((int)xb[r * K2 + p + s]), wv);
        }
    for (; p < K2; p++)
        for (int r = 0; r < MR; r++)
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_set1_epi32((int)xb[r * K2 + p]),
                                         (__m512bh)_mm512_loadu_si512((const void *)(w + p)));
    for (int r = 0; r < MR; r++) {
        for (int s = 1; s < S; s++) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][s]);
        finish(&acc[r][0], scale[r], flags, add ? add + r * N : 0, y + r * N, cols);
    }
}

/* Rows of x as bfloat16 pairs (k, k+1) in one 32-bit word each, rounded to nearest even. */
static void to_bf16_pairs(const float *x, int64_t rows, int64_t K, uint32_t *xb) {
    int64_t K2 = K / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        uint32_t *out = xb + r * K2;
        int64_t p = 0;
        for (; p + 16 <= K2; p += 16) {  /* 32 floats: the low 16 go to the low half */
            __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 2 * p + 16), _mm512_loadu_ps(xr + 2 * p));
            _mm512_storeu_si512((void *)(out + p), (__m512i)h);
        }
        for (; p < K2; p++) {
            __m512bh h = _mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(3, xr + 2 * p));
            out[p] = (uint32_t)_mm_cvtsi128_si32(_mm512_castsi512_si128((__m512i)h));
        }
    }
}

/* 0, or -1 when there was no memory for x in bfloat16 (y is then not written). K is even. */
int matmul_bf16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
                int flags, int threads) {
    int64_t K2 = K / 2, blocks = (N + 15) / 16;
    uint32_t *xb = malloc(sizeof(uint32_t) * (size_t)(ROWS * K2 > 0 ? ROWS * K2 : 1));
    float *scale = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!xb || !scale) {
        free(xb), free(scale);
        return -1;
    }
    row_scales(x, M, K, flags & UNIT, scale);
    (void)threads;
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        int64_t mr = M - r0 < ROWS ? M - r0 : ROWS;
        to_bf16_pairs(x + r0 * K, mr, K, xb);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t j = 0; j < blocks; j++) {
            const __m512bh *wj = (const __m512bh *)(w + j * K2 * 32);
            const float *a = add ? add + r0 * N + j * 16 : 0, *sc = scale + r0;
            float *yj = y + r0 * N + j * 16;
            int64_t cols = N - j * 16;
            switch (mr) {
#define TILE(MR, S) case MR: tile_bf16(xb, wj, sc, flags, a, yj, N, K2, cols, MR, S); break;
                TILE(1, 4) TILE(2, 2) TILE(3, 2) TILE(4, 1) TILE(5, 1) TILE(6, 1) TILE(7, 1) TILE(8, 1)
                TILE(9, 1) TILE(10, 1) TILE(11, 1) TILE(12, 1) TILE(13, 1) TILE(14, 1) TILE(15, 1)
                default: tile_bf16(xb, wj, sc, flags, a, yj, N, K2, cols, ROWS, 1); break;
#undef TILE
            }
        }
    }
    free(xb), free(scale);
    return 0;
}
#else
int matmul_bf16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
                int flags, int threads) {
    (void)x, (void)w, (void)add, (void)y, (void)M, (void)N, (void)K, (void)flags, (void)threads; /* features(): 0 */
    return -1;
}
#endif
