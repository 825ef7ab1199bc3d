/* The DARE search (GSU) for one user, fused: scores, top-K and softmax without the [C, N] score matrix.
 *
 * search.onnx computes all C x N scores with one MatMul, writes them (8 MB at N = 10,000, C = 200), then reads them
 * back for its two-step top-K. With caches cold, as under real traffic, that write and re-read plus the top-K's
 * operators cost more than the MatMul itself at small attention dims (docs/performance.md, rounds 3-5). This kernel
 * computes the same scores tile by tile and keeps only what the exact top-K needs:
 *
 *   pass 1  tiles of 8 history events (one block) x 32 candidates, computed in registers, the events' rows read
 *           straight from the embedding tables (no gathered copy). Per block and candidate it keeps the best
 *           score, its offset in the block and the second-best score; per candidate, the K largest block maxima
 *           so far (a 16-lane insertion network, run only when a lane improves);
 *   select  a candidate's K best events all lie in blocks whose maximum reaches its K-th largest block maximum
 *           (thr), which is at most its K-th best score; a selected block whose second best is below thr holds at
 *           most one of them, its best, which pass 1 already has;
 *   pass 2  rescores event by event only the selected blocks that may hold two, keeps a sorted list of the K best
 *           (score, then the lower position first: search.onnx's rule for ties), and turns it into softmax
 *           weights.
 *
 * Same arithmetic as search.onnx (UserSearchGraph with the position part folded): score(c, t) =
 * <scale * item[c], item[t]> + <scale * cate[c], cate[t]> + poscol[min(N - t, max_position)], summed in another
 * order (float32 rounding differs at the 1e-7 level, as between onnxruntime and PyTorch). Outputs: index [C, K]
 * (history positions, oldest = 0; -1 = padding when N < K) and weight [C, K] (softmax over the real ones).
 *
 * Built as the extension module service._search (setup.py). The kernel's body (_search_kernel.h) is compiled twice,
 * for AVX-512F and for AVX2 + FMA, and the best one this CPU has runs; on a CPU with neither (or not x86-64) `isa()`
 * is 0 and the service runs search.onnx (service/search.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#if defined(__x86_64__) && defined(__GNUC__)
#define DARE_X86 1
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef DARE_X86
#define TT 8    /* history events per tile = per block */
#define CT 32   /* candidates per tile: two 16-float vectors */
#define BLOCK TT

typedef float v16 __attribute__((vector_size(64)));

/* The best instruction set this CPU has for the kernel: 512 (AVX-512F), 256 (AVX2 + FMA) or 0 (neither). */
static int cpu_isa(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("fma")) return 0;
    if (__builtin_cpu_supports("avx512f")) return 512;
    return __builtin_cpu_supports("avx2") ? 256 : 0;
}

typedef struct {
    float score;
    int64_t index;
} Hit;

/* a is worse than b: a lower score, or the same score at a later position (lower index wins ties). */
static inline int worse(Hit a, Hit b) { return a.score < b.score || (a.score == b.score && a.index > b.index); }

/* Offer a hit to a candidate's sorted list of its K best (best first). */
static inline void offer(Hit *best, int64_t *filled, int64_t k, float bound, Hit hit) {
    /* Below the bound, or not better than the K-th so far: not one of the K best. */
    if (hit.score < bound || (*filled == k && !worse(best[k - 1], hit))) return;
    int64_t i = *filled < k ? (*filled)++ : k - 1;
    for (; i > 0 && worse(best[i - 1], hit); i--) best[i] = best[i - 1];
    best[i] = hit;
}

/* 64-byte vectors are passed between always-inlined helpers only, never across a call: the note that their calling
 * convention depends on AVX-512 does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define KISA 512
#include "_search_kernel.h"
#undef KISA
#define KISA 256
#include "_search_kernel.h"
#undef KISA

/* ------------------------------------------------------------------ pass 1 in bfloat16 (AVX-512 BF16 CPUs) */

/* The same block maxima from bfloat16 copies of the tables and queries: VDPBF16PS multiplies pairs of bfloat16
 * values and adds both products to a float32 lane, so a tile takes half the instructions of the float32 one. Each
 * approximate score is within the candidate's `slack` of the float32 one (computed in py_search), so pass 2 selects
 * the blocks whose approximate maximum reaches the K-th largest less twice the slack and rescores in float32 their
 * events that can reach it (the block's best alone when its second best cannot): the same top-K and weights as the
 * float32 kernel (up to its own float32 rounding). */
#define BTARGET __attribute__((target("avx512f,avx512bf16,fma")))

static int cpu_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512bf16");
}

/* float32 -> bfloat16, rounded to nearest even (the tables are finite: checked when a model loads). */
static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* One tile: a[r][v] = the approximate scores of the 8 events (bfloat16 rows ir[r], cr[r] of dp pairs) for
 * candidates 16v..16v+15 (packed queries q, qc: [dp][32] pairs each), without the position part. */
BTARGET __attribute__((always_inline)) static inline void tile_bf16(const uint32_t *const *ir, const uint32_t *const *cr,
                                                                      const uint32_t *q, const uint32_t *qc, int64_t dp,
                                                                      v16 a[TT][2]) {
    __m512 acc[TT][2];
    for (int r = 0; r < TT; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t *const *rows[2] = {ir, cr};
    const uint32_t *queries[2] = {q, qc};
    for (int part = 0; part < 2; part++) {
        const uint32_t *const *row = rows[part], *qp = queries[part];
        for (int64_t j = 0; j < dp; j++) {
            __m512bh q0 = (__m512bh)_mm512_load_si512(qp + j * CT), q1 = (__m512bh)_mm512_load_si512(qp + j * CT + 16);
#pragma GCC unroll 8
            for (int r = 0; r < TT; r++) {
                __m512bh h = (__m512bh)_mm512_set1_epi32((int)row[r][j]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], h, q0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], h, q1);
            }
        }
    }
    for (int r = 0; r < TT; r++) a[r][0] = (v16)acc[r][0], a[r][1] = (v16)acc[r][1];
}

/* block_maxima_avx512 with the bfloat16 tile: rows of dp pairs (uint32), queries qb [tile][2 dp][32]. */
BTARGET static void block_maxima_bf16(const uint32_t *item, const uint32_t *cate, int64_t dp, const float *poscol,
                                      const int64_t *hist_item, const int64_t *hist_cate, int64_t n, int64_t max_position,
                                      const uint32_t *qb, int64_t tiles, int64_t k, float *bmax, float *bsecond,
                                      uint8_t *barg, v16 *top, const uint32_t *zeros) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    const int64_t lines = (dp * 4 + 63) / 64;
    for (int64_t i = 0; i < tiles * 2 * k; i++)
        for (int l = 0; l < 16; l++) top[i][l] = -INFINITY;
    for (int64_t b = 0; b < nb; b++) {
        const uint32_t *ir[TT], *cr[TT];
        float pos[TT];
        int valid[TT];
        for (int r = 0; r < TT; r++) {
            int64_t t = b * BLOCK + r, p = n - t;
            valid[r] = t < n;
            ir[r] = valid[r] ? item + hist_item[t] * dp : zeros;
            cr[r] = valid[r] ? cate + hist_cate[t] * dp : zeros;
            pos[r] = valid[r] ? poscol[p < max_position ? p : max_position] : 0.0f;
        }
        for (int64_t t = (b + 1) * BLOCK; t < (b + 2) * BLOCK && t < n; t++) /* the next block's random rows */
            for (int64_t l = 0; l < lines; l++) {
                __builtin_prefetch((const char *)(item + hist_item[t] * dp) + 64 * l);
                __builtin_prefetch((const char *)(cate + hist_cate[t] * dp) + 64 * l);
            }
        for (int64_t ct = 0; ct < tiles; ct++) {
            const uint32_t *q = qb + ct * (2 * dp * CT), *qc = q + dp * CT;
            v16 a[TT][2];
            tile_bf16(ir, cr, q, qc, dp, a);
            const int64_t o = (b * tiles + ct) * CT;
            epilogue_avx512(a, valid, pos, 2, bmax + o, bsecond + o, barg + o);
            insert_max_avx512(top + (2 * ct) * k, k, bmax + o);
            insert_max_avx512(top + (2 * ct + 1) * k, k, bmax + o + 16);
        }
    }
}

#else
static int cpu_isa(void) { return 0; }
static int cpu_bf16(void) { return 0; }
#endif /* DARE_X86 */

/* Scratch memory, kept per thread between calls (the service scores on a small pool of worker threads): fresh
 * multi-megabyte allocations per call would page-fault on every call. Freed when the thread exits (anyio retires
 * idle worker threads), and not kept past a call when larger than SCRATCH_KEEP_BYTES (a rare huge request). */
#define SCRATCH_SLOTS 9
#define SCRATCH_KEEP_BYTES ((size_t)16 << 20)

typedef struct {
    void *ptr[SCRATCH_SLOTS];
    size_t size[SCRATCH_SLOTS];
} Scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_release(void *p) {
    Scratch *s = p;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(s->ptr[i]);
    free(s);
}

static void scratch_key_init(void) { (void)pthread_key_create(&scratch_key, scratch_release); }

static Scratch *scratch_of_thread(void) {
    pthread_once(&scratch_once, scratch_key_init);
    Scratch *s = pthread_getspecific(scratch_key);
    if (s == NULL && (s = calloc(1, sizeof(Scratch))) != NULL && pthread_setspecific(scratch_key, s) != 0) {
        free(s);
        s = NULL;
    }
    return s;
}

static void *scratch_get(Scratch *s, int slot, size_t size) {
    size = (size + 63) / 64 * 64;
    if (size == 0) size = 64;
    if (s->size[slot] < size) {
        free(s->ptr[slot]);
        s->ptr[slot] = aligned_alloc(64, size);
        s->size[slot] = s->ptr[slot] ? size : 0;
    }
    return s->ptr[slot];
}

static void scratch_trim(Scratch *s) {
    for (int i = 0; i < SCRATCH_SLOTS; i++)
        if (s->size[i] > SCRATCH_KEEP_BYTES) {
            free(s->ptr[i]);
            s->ptr[i] = NULL;
            s->size[i] = 0;
        }
}

/* ---------------------------------------------------------------------------------------------- the module */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, const char *name, Py_ssize_t itemsize, char kind, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer", name, writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int ok = b->view.itemsize == itemsize &&
             ((kind == 'f' && f[0] == 'f') || (kind == 'i' && (f[0] == 'q' || f[0] == 'l')) ||
              (kind == 'u' && (f[0] == 'I' || f[0] == 'L')));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s", name, kind == 'f' ? "float32" : kind == 'i' ? "int64" : "uint32");
        return -1;
    }
    return 0;
}

static Py_ssize_t count(Buf *b) { return b->view.len / b->view.itemsize; }

static int ids_in_range(Buf *b, Py_ssize_t rows, const char *name) {
    const int64_t *x = (const int64_t *)b->view.buf;
    for (Py_ssize_t i = 0; i < count(b); i++) {
        if (x[i] < 0 || x[i] >= rows) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %lld is outside the table's %zd rows", name, i, (long long)x[i],
                         rows);
            return -1;
        }
    }
    return 0;
}

#ifdef DARE_X86
static PyObject *py_search(PyObject *self, PyObject *args) {
    PyObject *o[9], *o16[2] = {Py_None, Py_None};
    double scale, norm[2] = {0.0, 0.0}, err[2] = {0.0, 0.0};
    long long d, max_position, k;
    int isa = 0;
    if (!PyArg_ParseTuple(args, "OOOLOOOOdLLOO|iOOdddd", &o[0], &o[1], &o[2], &d, &o[3], &o[4], &o[5], &o[6], &scale,
                          &max_position, &k, &o[7], &o[8], &isa, &o16[0], &o16[1], &norm[0], &norm[1], &err[0], &err[1]))
        return NULL;
    const int bf16 = o16[0] != Py_None;
    if (bf16 && (!cpu_bf16() || isa == 256 || o16[1] == Py_None)) {
        PyErr_SetString(PyExc_RuntimeError, o16[1] == Py_None ? "the bfloat16 search needs both bfloat16 tables"
                                            : isa == 256     ? "the bfloat16 search runs with the AVX-512 code, not isa=256"
                                                             : "the bfloat16 search needs AVX-512 BF16, which this CPU lacks");
        return NULL;
    }
    const int best_isa = cpu_isa();
    if (isa == 0) isa = best_isa;
    if (best_isa == 0 || (isa != 512 && isa != 256) || isa > best_isa) {
        PyErr_Format(PyExc_RuntimeError, "the fused search needs AVX2 + FMA or AVX-512F; this CPU offers %s, asked: %d",
                     best_isa == 512 ? "AVX-512F" : best_isa == 256 ? "AVX2 + FMA" : "neither", isa);
        return NULL;
    }
    static const char *names[9] = {"item_table", "cate_table", "position_column", "hist_item", "hist_cate",
                                   "cand_item",  "cand_cate",  "out_index",       "out_weight"};
    static const char kinds[9] = {'f', 'f', 'f', 'i', 'i', 'i', 'i', 'i', 'f'};
    Buf b[9], b16[2];
    memset(b, 0, sizeof b);
    memset(b16, 0, sizeof b16);
    PyObject *result = NULL;
    float *qt = NULL, *query = NULL, *bmax = NULL, *bsecond = NULL, *zeros = NULL, *slack = NULL;
    uint8_t *barg = NULL;
    v16 *top = NULL;
    int32_t *blocks = NULL;
    Hit *best = NULL;
    for (int i = 0; i < 9; i++)
        if (get_buf(o[i], &b[i], names[i], 8 - 4 * (kinds[i] == 'f'), kinds[i], i >= 7) != 0) goto done;
    if (d < 1 || k < 1 || max_position < 1 || count(&b[0]) % d || count(&b[1]) % d) {
        PyErr_SetString(PyExc_ValueError, "bad dimensions: d, k and max_position must be >= 1 and divide the tables");
        goto done;
    }
    const int64_t item_rows = count(&b[0]) / d, cate_rows = count(&b[1]) / d, dp = (d + 1) / 2;
    if (bf16) {
        static const char *names16[2] = {"item_table_bf16", "cate_table_bf16"};
        for (int i = 0; i < 2; i++)
            if (get_buf(o16[i], &b16[i], names16[i], 4, 'u', 0) != 0) goto done;
        if (count(&b16[0]) != item_rows * dp || count(&b16[1]) != cate_rows * dp) {
            PyErr_SetString(PyExc_ValueError, "the bfloat16 tables must hold the tables' rows in (d + 1) / 2 pairs each");
            goto done;
        }
    }
    const int64_t n = count(&b[3]), c_count = count(&b[5]);
    if (count(&b[4]) != n || count(&b[6]) != c_count || count(&b[2]) != max_position + 1 ||
        count(&b[7]) != c_count * k || count(&b[8]) != c_count * k) {
        PyErr_SetString(PyExc_ValueError, "inconsistent lengths: history, candidates, position column or outputs");
        goto done;
    }
    if (ids_in_range(&b[3], item_rows, "hist_item") || ids_in_range(&b[4], cate_rows, "hist_cate") ||
        ids_in_range(&b[5], item_rows, "cand_item") || ids_in_range(&b[6], cate_rows, "cand_cate"))
        goto done;
    const float *item = b[0].view.buf, *cate = b[1].view.buf, *poscol = b[2].view.buf;
    const int64_t *hi = b[3].view.buf, *hc = b[4].view.buf, *ci = b[5].view.buf, *cc = b[6].view.buf;
    const int64_t tiles = (c_count + CT - 1) / CT, nb = (n + BLOCK - 1) / BLOCK;
    const int last_halves = c_count - (tiles - 1) * CT > 16 ? 2 : 1;
    Scratch *sc = scratch_of_thread();
    if (sc == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    qt = scratch_get(sc, 0, (size_t)tiles * 2 * d * CT * sizeof(float));
    query = scratch_get(sc, 1, (size_t)c_count * 2 * d * sizeof(float));
    bmax = scratch_get(sc, 2, (size_t)nb * tiles * CT * sizeof(float));
    zeros = scratch_get(sc, 3, (size_t)(d + 1) * sizeof(float));
    top = scratch_get(sc, 4, (size_t)tiles * 2 * k * sizeof(v16));
    blocks = scratch_get(sc, 5, (size_t)16 * nb * sizeof(int32_t));
    bsecond = scratch_get(sc, 6, (size_t)nb * tiles * CT * sizeof(float));
    barg = scratch_get(sc, 7, (size_t)nb * tiles * CT);
    if (bf16) slack = scratch_get(sc, 8, (size_t)tiles * CT * sizeof(float));
    best = malloc((size_t)k * sizeof(Hit));
    if (!qt || !query || !bmax || !zeros || !top || !blocks || !bsecond || !barg || !best || (bf16 && !slack)) {
        PyErr_NoMemory();
        goto done;
    }
    memset(zeros, 0, (size_t)(d + 1) * sizeof(float));
    Py_BEGIN_ALLOW_THREADS;
    const float s = (float)scale;
    /* The scaled queries, row-major for pass 2 and (float32 pass 1) packed [tile][2d][32] (padding candidates: 0). */
    if (!bf16) memset(qt, 0, (size_t)tiles * 2 * d * CT * sizeof(float));
    for (int64_t c = 0; c < c_count; c++) {
        float *row = query + c * 2 * d;
        for (int64_t j = 0; j < d; j++) {
            row[j] = item[ci[c] * d + j] * s;
            row[d + j] = cate[cc[c] * d + j] * s;
        }
        float *packed = qt + (c / CT) * (2 * d * CT) + c % CT;
        if (!bf16)
            for (int64_t j = 0; j < 2 * d; j++) packed[j * CT] = row[j];
    }
    if (bf16) {
        /* Pass 1 from bfloat16 pairs, [tile][2 dp][32] (qt's memory: as many bytes or fewer), and per candidate the
         * bound on |approximate - float32 score|. Per part, with q~ and h~ the rounded query and row:
         * |<q~, h~> - <q, h>| <= |<q~, h~ - h>| + |<q~ - q, h>| <= |q~| err + |q~ - q| norm (Cauchy-Schwarz), where
         * err and norm are the table's largest |h~ - h| and |h| (Bf16Tables). Plus both passes' float32 rounding:
         * at most 2d 2^-24 |q| |h| per sum, and 2^-24 of the position term per addition; then a 1/16 margin. */
        uint32_t *qb = (uint32_t *)qt;
        memset(qb, 0, (size_t)tiles * 2 * dp * CT * sizeof(uint32_t));
        memset(slack, 0, (size_t)tiles * CT * sizeof(float));
        float pos_max = 0.0f;
        for (int64_t p = 1; p <= max_position; p++) pos_max = fmaxf(pos_max, fabsf(poscol[p])); /* events' positions: >= 1 */
        for (int64_t c = 0; c < c_count; c++) {
            const float *row = query + c * 2 * d;
            uint32_t *packed = qb + (c / CT) * (2 * dp * CT) + c % CT;
            double bound = 0.0;
            for (int part = 0; part < 2; part++) {
                double sq = 0.0, sq_rounded = 0.0, sq_error = 0.0;
                for (int64_t j = 0; j < d; j++) {
                    const float x = row[part * d + j];
                    const uint16_t h = to_bf16(x);
                    const uint32_t bits = (uint32_t)h << 16;
                    float xr;
                    memcpy(&xr, &bits, sizeof xr);
                    sq += (double)x * x;
                    sq_rounded += (double)xr * xr;
                    sq_error += ((double)xr - x) * ((double)xr - x);
                    packed[(part * dp + j / 2) * CT] |= (uint32_t)h << (16 * (j % 2));
                }
                bound += sqrt(sq_rounded) * err[part] + sqrt(sq_error) * norm[part] +
                         4.0 * d * 0x1p-24 * (sqrt(sq) + sqrt(sq_rounded)) * (norm[part] + err[part]);
            }
            slack[c] = (float)(1.0625 * (bound + 0x1p-22 * pos_max) + 1e-30);
        }
        block_maxima_bf16(b16[0].view.buf, b16[1].view.buf, dp, poscol, hi, hc, n, max_position, qb, tiles, k, bmax,
                          bsecond, barg, top, (const uint32_t *)zeros);
        exact_topk_avx512(item, cate, d, poscol, hi, hc, n, max_position, query, c_count, bmax, bsecond, barg, top, tiles,
                          k, b[7].view.buf, b[8].view.buf, best, blocks, slack);
    } else if (isa == 512) {
        block_maxima_avx512(item, cate, d, poscol, hi, hc, n, max_position, qt, tiles, k, bmax, bsecond, barg, top, zeros, last_halves);
        exact_topk_avx512(item, cate, d, poscol, hi, hc, n, max_position, query, c_count, bmax, bsecond, barg, top, tiles,
                          k, b[7].view.buf, b[8].view.buf, best, blocks, NULL);
    } else {
        block_maxima_avx2(item, cate, d, poscol, hi, hc, n, max_position, qt, tiles, k, bmax, bsecond, barg, top, zeros, last_halves);
        exact_topk_avx2(item, cate, d, poscol, hi, hc, n, max_position, query, c_count, bmax, bsecond, barg, top, tiles,
                        k, b[7].view.buf, b[8].view.buf, best, blocks, NULL);
    }
    scratch_trim(sc);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    free(best);
    for (int i = 0; i < 9; i++)
        if (b[i].held) PyBuffer_Release(&b[i].view);
    for (int i = 0; i < 2; i++)
        if (b16[i].held) PyBuffer_Release(&b16[i].view);
    return result;
}
#else
static PyObject *py_search(PyObject *self, PyObject *args) {
    PyErr_SetString(PyExc_RuntimeError, "the fused search needs an x86-64 CPU with AVX2 + FMA or AVX-512F");
    return NULL;
}
#endif

static PyObject *py_isa(PyObject *self, PyObject *unused) { return PyLong_FromLong(cpu_isa()); }

static PyObject *py_bf16(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_bf16()); }

static PyMethodDef methods[] = {
    {"search", py_search, METH_VARARGS,
     "search(item_table, cate_table, position_column, d, hist_item, hist_cate, cand_item, cand_cate, scale, "
     "max_position, k, out_index, out_weight, isa=0, item_bf16=None, cate_bf16=None, item_norm=0, cate_norm=0, "
     "item_err=0, cate_err=0) -> "
     "None: the fused search of one user (see service/search.py); isa 512 or 256 picks the AVX-512F or the AVX2 code, "
     "0 the best this CPU has; with the tables in bfloat16 pairs (uint32 [rows, (d + 1) / 2]), their largest row "
     "norms and rounding errors (norms), pass 1 runs in bfloat16 (AVX-512 BF16)."},
    {"isa", py_isa, METH_NOARGS, "isa() -> int: 512 (AVX-512F), 256 (AVX2 + FMA) or 0 (the kernel cannot run here)."},
    {"bf16", py_bf16, METH_NOARGS, "bf16() -> bool: whether this CPU runs the bfloat16 pass 1 (AVX-512 BF16)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_search", "The fused DARE search kernel.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__search(void) { return PyModule_Create(&module); }
