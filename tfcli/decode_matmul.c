/* The matmuls of tfcli's cached steps on a CPU: y = add + x W^T, x float32 (M, K), W half or float32.
 *
 * Why C: a decode step multiplies one row (or 16, for a batch of samples) by each weight
 * matrix. PyTorch's CPU kernels for so few rows read float16 weights at a third of the speed
 * the cache delivers them (one row of the 3.2M model: 0.32 ms for its 17 matrices, against 0.09
 * here) and, through oneDNN, ran 16 bfloat16 rows at 40% of this CPU's bfloat16 peak. Two
 * kernels, each on a layout made once per model and dtype by tfcli/native_decoder.py (`pack`):
 *
 *   matmul_f16:  float16 weights (Nb, K, 16), 16 output columns per block, converted to float32
 *                and multiplied by float32 x: for one or two rows (single samples), where the
 *                weights' bytes set the speed, and float16 keeps three more bits than bfloat16.
 *                AVX-512, or AVX2 with F16C and FMA.
 *   matmul_f32:  the same for float32 weights: small models, whose weights fit a cache anyway.
 *   matmul_bf16: bfloat16 weights (Nb, K/2, 16, 2), pairs of k per column as AVX512_BF16's dot
 *                product reads them; x is rounded to bfloat16 (as oneDNN's bfloat16 matmul does)
 *                and products are summed in float32: for batches, where the arithmetic sets it.
 *                On CPUs with AMX (Intel Xeon since Sapphire Rapids), on AMX's tiles, whose
 *                layout this already is: 16 rows of the 10.7M model's six layers took 0.74 ms
 *                there, against 2.56 through AVX512_BF16 and 1.25 through oneDNN's AMX kernels
 *                (whose epilogues, RMSNorm and casts are further PyTorch calls).
 *
 * And decode_step: a whole decode step, these matmuls and decode_attention.c's kernel, in one call.
 *
 * `features()` says which were compiled in (and 4: AMX, usable in this process); tfcli/native_decoder.py uses only those. The last
 * block's columns past N are zero weights (stored, by the layout), whose products are not written. `flags` fold in what surrounds a
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
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#endif

#if defined(HAVE_AMX)
static int amx_usable(void);
#else
static int amx_usable(void) { return 0; }
#endif

int features(void) {
    int f = 0;
#if defined(HAVE_F16)
    f |= 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    f |= 2;
#endif
    if (amx_usable()) f |= 4;
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
#define MAX_MR (VECS == 1 ? 8 : 4) /* rows a pass: 8 chains of multiply-adds, and registers to hold them */

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

/* One weight vector: float32 as it is, or float16 converted. */
ALWAYS_INLINE vec vload_w(const void *w, int64_t i, const int f32) {
    return f32 ? vload((const float *)w + i) : vload_f16((const uint16_t *)w + i);
}

/* MR rows (a constant once inlined) by one block of 16 columns; S independent sums per row over
 * alternating k, so that at least four chains of multiply-adds are in flight. */
ALWAYS_INLINE void tile_f(const float *x, const void *w, const float *scale, int flags, const float *add,
                          float *y, int64_t N, int64_t K, int64_t cols, const int MR, const int S, const int f32) {
    vec acc[8][4][VECS];
    for (int r = 0; r < MR; r++)
        for (int s = 0; s < S; s++)
            for (int v = 0; v < VECS; v++) acc[r][s][v] = vzero();
    int64_t k = 0;
    for (; k + S <= K; k += S)
        for (int s = 0; s < S; s++)
            for (int v = 0; v < VECS; v++) {
                vec wv = vload_w(w, (k + s) * 16 + v * LANES, f32);
                for (int r = 0; r < MR; r++) acc[r][s][v] = vfma(vset(x[r * K + k + s]), wv, acc[r][s][v]);
            }
    for (; k < K; k++)
        for (int v = 0; v < VECS; v++) {
            vec wv = vload_w(w, k * 16 + v * LANES, f32);
            for (int r = 0; r < MR; r++) acc[r][0][v] = vfma(vset(x[r * K + k]), wv, acc[r][0][v]);
        }
    for (int r = 0; r < MR; r++) {
        for (int s = 1; s < S; s++)
            for (int v = 0; v < VECS; v++) acc[r][0][v] = vadd(acc[r][0][v], acc[r][s][v]);
        finish(acc[r][0], scale[r], flags, add ? add + r * N : 0, y + r * N, cols);
    }
}

/* Every row of x by block j of the weights: float16 (Nb, K, 16), or float32 where `f32`. */
ALWAYS_INLINE void block_f(const float *x, const void *w, const float *scale, int flags, const float *add, float *y,
                           int64_t M, int64_t N, int64_t K, int64_t j, const int f32) {
    const void *wj = f32 ? (const void *)((const float *)w + j * K * 16) : (const void *)((const uint16_t *)w + j * K * 16);
    int64_t cols = N - j * 16;
    for (int64_t r = 0; r < M; r += MAX_MR) {
        const float *xr = x + r * K, *ar = add ? add + r * N + j * 16 : 0;
        float *yr = y + r * N + j * 16;
        switch (M - r < MAX_MR ? M - r : MAX_MR) {
            case 1: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 1, 4, f32); break;
            case 2: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 2, 2, f32); break;
            case 3: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 3, 1, f32); break;
#if MAX_MR > 4
            case 4: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 4, 1, f32); break;
            case 5: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 5, 1, f32); break;
            case 6: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 6, 1, f32); break;
            case 7: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, 7, 1, f32); break;
#endif
            default: tile_f(xr, wj, scale + r, flags, ar, yr, N, K, cols, MAX_MR, 1, f32); break;
        }
    }
}

/* The float16 and float32 kernels (the same body, each with its weights' type a constant, which
 * OpenMP's outlined loop keeps only when written out in each): 0, or -1 when there was no memory
 * for the rows' scales (y is then not written). */
int matmul_f16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
               int flags, int threads) {
    float *scale = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!scale) return -1;
    row_scales(x, M, K, flags & UNIT, scale);
    (void)threads; /* read by the pragma only when compiled with OpenMP */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < (N + 15) / 16; j++) block_f(x, w, scale, flags, add, y, M, N, K, j, 0);
    free(scale);
    return 0;
}

int matmul_f32(const float *x, const float *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
               int flags, int threads) {
    float *scale = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!scale) return -1;
    row_scales(x, M, K, flags & UNIT, scale);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < (N + 15) / 16; j++) block_f(x, w, scale, flags, add, y, M, N, K, j, 1);
    free(scale);
    return 0;
}
#else
int matmul_f16(const float *x, const uint16_t *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
               int flags, int threads) {
    (void)x, (void)w, (void)add, (void)y, (void)M, (void)N, (void)K, (void)flags, (void)threads; /* features(): 0 */
    return -1;
}

int matmul_f32(const float *x, const float *w, const float *add, float *y, int64_t M, int64_t N, int64_t K,
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

#if defined(HAVE_AMX)
/* AMX (Intel Xeon since Sapphire Rapids): one instruction multiplies a 16-row tile of x by a
 * 16-pair tile of the weights. The bfloat16 layout above is already AMX's: a block's 16 pairs of
 * k from pair p on are a 16 x 64-byte tile, rows 64 bytes apart. Tiles, set per thread:
 * 0, 1: sums of two column blocks; 2: x, 16 pairs; 3: x, the last K2 % 16 pairs; 4, 5: weights of
 * the two blocks, 16 pairs; 6, 7: theirs, the last pairs. */
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static int amx_usable(void) {
    static int state = -1; /* Linux hands out AMX's register state only to a process that asks */
    if (state < 0) {
        const char *off = getenv("TFCLI_NO_AMX"); /* AVX512_BF16 instead: to compare, or to get round a fault */
        state = !(off && *off && strcmp(off, "0")) &&
                syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    }
    return state;
}

static void configure_tiles(int64_t mr, int64_t tail) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    c.rows[0] = c.rows[1] = c.rows[2] = c.rows[3] = (uint8_t)mr;
    c.colsb[3] = (uint16_t)(tail ? tail * 4 : 64);
    c.rows[6] = c.rows[7] = (uint8_t)(tail ? tail : 16);
    _tile_loadconfig(&c);
}

/* y for mr rows of xb (bfloat16, rows K2 pairs apart) by blocks j and j + 1 of w (both when
 * `two`): sums in tiles, then the same epilogue as the vector kernel's. */
static void amx_blocks(const uint32_t *xb, const uint16_t *w, const float *scale, int flags, const float *add,
                       float *y, int64_t mr, int64_t N, int64_t K2, int64_t j, int two) {
    float sums[2][16][16] __attribute__((aligned(64)));
    const uint16_t *w0 = w + j * K2 * 32, *w1 = w0 + K2 * 32;
    int64_t full = K2 / 16 * 16, stride = K2 * 4;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t p = 0; p < full; p += 16) {
        _tile_loadd(2, xb + p, stride);
        _tile_loadd(4, w0 + p * 32, 64);
        _tile_dpbf16ps(0, 2, 4);
        if (two) {
            _tile_loadd(5, w1 + p * 32, 64);
            _tile_dpbf16ps(1, 2, 5);
        }
    }
    if (full < K2) {
        _tile_loadd(3, xb + full, stride);
        _tile_loadd(6, w0 + full * 32, 64);
        _tile_dpbf16ps(0, 3, 6);
        if (two) {
            _tile_loadd(7, w1 + full * 32, 64);
            _tile_dpbf16ps(1, 3, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    if (two) _tile_stored(1, sums[1], 64);
    for (int b = 0; b <= two; b++) {
        int64_t col = (j + b) * 16;
        for (int64_t r = 0; r < mr; r++) {
            __m512 a = _mm512_load_ps(sums[b][r]);
            finish(&a, scale[r], flags, add ? add + r * N + col : 0, y + r * N + col, N - col);
        }
    }
}

static void matmul_amx(const uint32_t *xb, const uint16_t *w, const float *scale, int flags, const float *add,
                       float *y, int64_t mr, int64_t N, int64_t K2, int threads) {
    int64_t blocks = (N + 15) / 16, pairs = (blocks + 1) / 2;
    (void)threads;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(mr, K2 % 16);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < pairs; i++)
            amx_blocks(xb, w, scale, flags, add, y, mr, N, K2, 2 * i, 2 * i + 1 < blocks);
        _tile_release();
    }
}
#endif

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
#if defined(HAVE_AMX)
        if (amx_usable()) {
            matmul_amx(xb, w, scale + r0, flags, add ? add + r0 * N : 0, y + r0 * N, mr, N, K2, threads);
            continue;
        }
#endif
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

/* A whole decode step, one call from Python: a small model's step in PyTorch is made of call
 * overhead (~20 kernels and ctypes calls of 5-20 us each, for a 0.8M model's 17 matmuls that take
 * well under a microsecond each), which this removes.
 *
 * kind: the weights' type, 0 float16, 1 float32, 2 bfloat16 (each in its layout above; wte, the
 * embedding, plain (vocab, C) in the same type). weights: per layer qkv, proj, fc, out, then the
 * head. x: (B, C) float32, the residual stream; work: B * (4C + F) floats; logits: (B, V). The
 * attention is decode_attention.c's step_f32 or step_f16 for the ring's type, passed by address;
 * layer l's ring starts ring_layer bytes after layer l - 1's, and the rest of its arguments are
 * that kernel's. 0; -1 when a matmul found no memory, -2 for a token id outside [0, V). (After a -1,
 * earlier layers have stored this position's keys and values: the step is to be taken again or not at all.) */
typedef void (*attention_step)(const float *qkv, const float *cos, const float *sin, void *ring, int64_t rkv,
                               int64_t rb, int64_t rh, const int64_t *slot, int64_t n, int64_t B, int64_t H,
                               int64_t D, float scale, float *out, int threads);

#if defined(HAVE_F16)
static int matmul_kind(int kind, const float *x, const void *w, const float *add, float *y, int64_t M, int64_t N,
                       int64_t K, int flags, int threads) {
    if (kind == 0) return matmul_f16(x, w, add, y, M, N, K, flags, threads);
    if (kind == 1) return matmul_f32(x, w, add, y, M, N, K, flags, threads);
    return matmul_bf16(x, w, add, y, M, N, K, flags, threads);
}

static float weight_at(int kind, const void *w, int64_t i) {
    if (kind == 1) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (kind == 2) {
        uint32_t bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
#if defined(__AVX512F__) /* (F16C's _cvtsh_ss is not implied by a hand-picked -mavx512f) */
    return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16((short)h)));
#else
    return _cvtsh_ss(h);
#endif
}

int decode_step(int kind, const void *wte, const void *const *weights, const int64_t *idx, int64_t L, int64_t B,
                int64_t C, int64_t F, int64_t V, float *x, float *work, float *logits, attention_step attend,
                char *ring, int64_t ring_layer, int64_t rkv, int64_t rb, int64_t rh, const float *cos,
                const float *sin, const int64_t *slot, int64_t n, int64_t H, float scale, int threads) {
    float *qkv = work, *y = qkv + B * 3 * C, *h = y + B * C;
    for (int64_t b = 0; b < B; b++)
        if (idx[b] < 0 || idx[b] >= V) return -2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) x[b * C + c] = weight_at(kind, wte, idx[b] * C + c);
    for (int64_t l = 0; l < L; l++) {
        const void *const *w = weights + 4 * l;
        if (matmul_kind(kind, x, w[0], 0, qkv, B, 3 * C, C, UNIT, threads)) return -1;
        attend(qkv, cos, sin, ring + l * ring_layer, rkv, rb, rh, slot, n, B, H, C / H, scale, y, threads);
        if (matmul_kind(kind, y, w[1], x, x, B, C, C, 0, threads)) return -1;  /* (add and y may alias) */
        if (matmul_kind(kind, x, w[2], 0, h, B, F, C, UNIT | RELU2, threads)) return -1;
        if (matmul_kind(kind, h, w[3], x, x, B, C, F, 0, threads)) return -1;
    }
    return matmul_kind(kind, x, weights[4 * L], 0, logits, B, V, C, UNIT, threads);
}
#else
int decode_step(int kind, const void *wte, const void *const *weights, const int64_t *idx, int64_t L, int64_t B,
                int64_t C, int64_t F, int64_t V, float *x, float *work, float *logits, attention_step attend,
                char *ring, int64_t ring_layer, int64_t rkv, int64_t rb, int64_t rh, const float *cos,
                const float *sin, const int64_t *slot, int64_t n, int64_t H, float scale, int threads) {
    (void)kind, (void)wte, (void)weights, (void)idx, (void)L, (void)B, (void)C, (void)F, (void)V, (void)x, (void)work;
    (void)logits, (void)attend, (void)ring, (void)ring_layer, (void)rkv, (void)rb, (void)rh, (void)cos, (void)sin;
    (void)slot, (void)n, (void)H, (void)scale, (void)threads; /* features(): 0, so never called */
    return -1;
}
#endif
