/* The DARE search (GSU) for one user, fused: scores, top-K and softmax without the [C, N] score matrix.
 *
 * search.onnx computes all C x N scores with one MatMul, writes them (8 MB at N = 10,000, C = 200), then reads them
 * back for its two-step top-K. With caches cold, as under real traffic, that write and re-read plus the top-K's
 * operators cost more than the MatMul itself at small attention dims (docs/performance.md, rounds 3-5). This kernel
 * computes the same scores tile by tile and keeps only what the exact top-K needs:
 *
 *   pass 1  for every block of BLOCK history events and every candidate, the block's maximum score, computed in
 *           registers (AVX-512: 8 events x 32 candidates per tile, the events' rows read straight from the
 *           embedding tables, no gathered copy);
 *   select  per candidate, the K-th largest block maximum: every one of its K best events lies in a block whose
 *           maximum reaches it;
 *   pass 2  per candidate, the exact scores of the events in those blocks only (K to a few K blocks); those that
 *           reach the K-th largest block maximum go into a sorted list of the K best (score, then lower index
 *           first), whose scores become softmax weights.
 *
 * Same arithmetic as search.onnx (UserSearchGraph with the position part folded): score(c, t) =
 * <scale * item[c], item[t]> + <scale * cate[c], cate[t]> + poscol[min(N - t, max_position)], summed in another
 * order (float32 rounding differs at the 1e-7 level, as between onnxruntime and PyTorch). Outputs: index [C, K]
 * (history positions, oldest = 0; -1 = padding when N < K) and weight [C, K] (softmax over the real ones).
 *
 * Built as the extension module service._search (setup.py); only the AVX-512 path exists: elsewhere
 * `supported()` is false and the service runs search.onnx (service/search.py).
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
#define GROUP 4 /* blocks per pass over the candidate tiles */
#ifndef AHEAD
#define AHEAD 1 /* pass 2 prefetches the rows of the block this many ahead */
#endif

typedef float v16 __attribute__((vector_size(64)));

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* ---------------------------------------------------------------- pass 1: block maxima and their K-th largest */

/* Per candidate lane, `top` holds the K largest block maxima so far, in descending order (top[K-1] = the K-th). */
__attribute__((target("avx512f,fma"))) static inline void insert_max(v16 *top, int64_t k, v16 x) {
    __mmask16 m = _mm512_cmp_ps_mask((__m512)x, (__m512)top[k - 1], _CMP_GT_OQ);
    if (!m) return;
    for (int64_t i = 0; i < k; i++) {
        v16 hi = (v16)_mm512_max_ps((__m512)top[i], (__m512)x);
        x = (v16)_mm512_min_ps((__m512)top[i], (__m512)x);
        top[i] = hi;
    }
}

__attribute__((target("avx512f,fma"))) static void block_maxima(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *qt, int64_t tiles, int64_t k,
    float *bmax /* [nb][tiles * 32] */, float *bsecond, uint8_t *barg, v16 *top /* [tiles * 2][k] */,
    const float *zeros) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    const int64_t lines = (d * 4 + 63) / 64;
    const v16 neg_inf = (v16)_mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < tiles * 2 * k; i++) top[i] = neg_inf;
    for (int64_t b0 = 0; b0 < nb; b0 += GROUP) {
        /* GROUP blocks share each candidate tile's packed queries while they are in L1. */
        const int64_t g_end = b0 + GROUP < nb ? b0 + GROUP : nb;
        const float *irow[GROUP][TT], *crow[GROUP][TT];
        float pos[GROUP][TT];
        int valid[GROUP][TT];
        for (int64_t b = b0; b < g_end; b++) {
            for (int r = 0; r < TT; r++) {
                int64_t t = b * BLOCK + r;
                int ok = t < n;
                valid[b - b0][r] = ok;
                irow[b - b0][r] = ok ? item + hist_item[t] * d : zeros;
                crow[b - b0][r] = ok ? cate + hist_cate[t] * d : zeros;
                int64_t p = n - t;
                pos[b - b0][r] = ok ? poscol[p < max_position ? p : max_position] : 0.0f;
            }
        }
        /* The next group's rows are random table rows: fetch them while this group computes. */
        for (int64_t t = g_end * BLOCK; t < (g_end + GROUP) * BLOCK && t < n; t++) {
            const char *pi = (const char *)(item + hist_item[t] * d), *pc = (const char *)(cate + hist_cate[t] * d);
            for (int64_t l = 0; l < lines; l++) {
                __builtin_prefetch(pi + 64 * l);
                __builtin_prefetch(pc + 64 * l);
            }
        }
        for (int64_t ct = 0; ct < tiles; ct++) {
            const float *q = qt + ct * (2 * d * CT); /* [2d][32] */
            const float *qc = q + d * CT;
            for (int64_t b = b0; b < g_end; b++) {
                const float *const *ir = irow[b - b0], *const *cr = crow[b - b0];
                v16 a[TT][2];
                for (int r = 0; r < TT; r++) a[r][0] = a[r][1] = (v16){0};
                for (int64_t j = 0; j < d; j++) {
                    v16 q0 = *(const v16 *)(q + j * CT), q1 = *(const v16 *)(q + j * CT + 16);
#pragma GCC unroll 8
                    for (int r = 0; r < TT; r++) {
                        float h = ir[r][j];
                        a[r][0] += h * q0;
                        a[r][1] += h * q1;
                    }
                }
                for (int64_t j = 0; j < d; j++) {
                    v16 q0 = *(const v16 *)(qc + j * CT), q1 = *(const v16 *)(qc + j * CT + 16);
#pragma GCC unroll 8
                    for (int r = 0; r < TT; r++) {
                        float h = cr[r][j];
                        a[r][0] += h * q0;
                        a[r][1] += h * q1;
                    }
                }
                /* Per candidate: the block's best score, its offset in the block (the first of equal ones), and
                 * the second best (equal to the best on a tie), which says whether the block can hold two of the
                 * candidate's K best. */
                __m512 best[2] = {(__m512)neg_inf, (__m512)neg_inf}, second[2] = {(__m512)neg_inf, (__m512)neg_inf};
                __m512i at[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 8
                for (int r = 0; r < TT; r++) {
                    if (!valid[b - b0][r]) continue;
                    v16 p = (v16)_mm512_set1_ps(pos[b - b0][r]);
                    for (int v = 0; v < 2; v++) {
                        __m512 x = (__m512)(a[r][v] + p);
                        __mmask16 gt = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
                        second[v] = _mm512_max_ps(second[v], _mm512_min_ps(best[v], x));
                        best[v] = _mm512_max_ps(best[v], x);
                        at[v] = _mm512_mask_mov_epi32(at[v], gt, _mm512_set1_epi32(r));
                    }
                }
                const int64_t o = (b * tiles + ct) * CT;
                for (int v = 0; v < 2; v++) {
                    _mm512_store_ps(bmax + o + 16 * v, best[v]);
                    _mm512_store_ps(bsecond + o + 16 * v, second[v]);
                    _mm_storeu_si128((__m128i *)(barg + o + 16 * v), _mm512_cvtepi32_epi8(at[v]));
                }
                v16 m0 = (v16)best[0], m1 = (v16)best[1];
                insert_max(top + (2 * ct) * k, k, m0);
                insert_max(top + (2 * ct + 1) * k, k, m1);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------- pass 2: exact top-K */

typedef struct {
    float score;
    int64_t index;
} Hit;

/* a is worse than b: a lower score, or the same score at a later position (lower index wins ties). */
static inline int worse(Hit a, Hit b) { return a.score < b.score || (a.score == b.score && a.index > b.index); }

/* <q_item, item_row> + <q_cate, cate_row> in one vector accumulator (masked loads for a d that is not a multiple
 * of 16). */
__attribute__((target("avx512f,fma"))) static inline float dot2(const float *qi, const float *ri, const float *qc,
                                                               const float *rc, int64_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) { /* four independent chains: the FMA latency, not its throughput, bounds one */
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qi + j), _mm512_loadu_ps(ri + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qc + j), _mm512_loadu_ps(rc + j), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qi + j + 16), _mm512_loadu_ps(ri + j + 16), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qc + j + 16), _mm512_loadu_ps(rc + j + 16), a3);
    }
    for (; j < d; j += 16) {
        __mmask16 m = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qi + j), _mm512_maskz_loadu_ps(m, ri + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qc + j), _mm512_maskz_loadu_ps(m, rc + j), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* Offer a hit to a candidate's sorted list of its K best (best first). */
static inline void offer(Hit *best, int64_t *filled, int64_t k, float bound, Hit hit) {
    /* Below the bound, or not better than the K-th so far: not one of the K best. */
    if (hit.score < bound || (*filled == k && !worse(best[k - 1], hit))) return;
    int64_t i = *filled < k ? (*filled)++ : k - 1;
    for (; i > 0 && worse(best[i - 1], hit); i--) best[i] = best[i - 1];
    best[i] = hit;
}

/* Score block b's events for one candidate (query q = [scale * item, scale * cate]) and offer them; returns how
 * many events it scored. */
__attribute__((target("avx512f,fma"))) static int64_t score_block(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *q, int64_t b, float bound, Hit *best,
    int64_t *filled, int64_t k) {
    const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
    for (int64_t t = b * BLOCK; t < end; t++) {
        const int64_t p = n - t;
        offer(best, filled, k, bound,
              (Hit){dot2(q, item + hist_item[t] * d, q + d, cate + hist_cate[t] * d, d) +
                        poscol[p < max_position ? p : max_position],
                    t});
    }
    return end - b * BLOCK;
}

__attribute__((target("avx512f,fma"))) static void exact_topk(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *query /* [C][2d] */, int64_t c_count,
    const float *bmax, const float *bsecond, const uint8_t *barg, const v16 *top, int64_t tiles, int64_t k, int64_t *out_index, float *out_weight, Hit *best,
    int32_t *blocks /* [16][nb] */) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    for (int64_t cv = 0; cv < tiles * 2; cv++) {
        /* For these 16 candidates, the blocks whose maximum reaches the candidate's K-th largest block maximum
         * (at least K of them, all of them when there are fewer than K). */
        int32_t count[16] = {0};
        __m512 thr = (__m512)top[cv * k + k - 1];
        for (int64_t b = 0; b < nb; b++) {
            __mmask16 m = _mm512_cmp_ps_mask(_mm512_load_ps(bmax + b * tiles * CT + cv * 16), thr, _CMP_GE_OQ);
            while (m) {
                int lane = __builtin_ctz(m);
                m &= m - 1;
                blocks[lane * nb + count[lane]++] = (int32_t)b;
            }
        }
        for (int lane = 0; lane < 16 && cv * 16 + lane < c_count; lane++) {
            const int64_t c = cv * 16 + lane;
            const float *qi = query + c * 2 * d;
            /* thr, the K-th largest block maximum, is at most the K-th largest score: an event below it is not
             * one of the K best, and every one of the K best lies in a block whose maximum reaches it. */
            const float thr = top[(cv * k + k - 1)][lane];
            const int32_t *list = blocks + lane * nb;
            const int64_t col = (cv / 2) * CT + (cv % 2) * 16 + lane, stride = tiles * CT;
            int64_t filled = 0, seen = 0; /* best[0..filled) sorted, best first */
            /* A selected block whose second best is below thr holds one of the K best at most: its best, whose
             * score and offset pass 1 kept. The others (and every block when there are fewer than K) are scored
             * again event by event. */
            for (int32_t s = 0; s < count[lane]; s++) {
                const int64_t b = list[s];
                if (bsecond[b * stride + col] < thr) {
                    offer(best, &filled, k, thr, (Hit){bmax[b * stride + col], b * BLOCK + barg[b * stride + col]});
                    seen++;
                    continue;
                }
                seen += score_block(item, cate, d, poscol, hist_item, hist_cate, n, max_position, qi, b, thr, best, &filled, k);
            }
            /* Rescored events are summed in another order than pass 1's, so one can land a rounding error below
             * thr; if that leaves fewer than K, the candidate's blocks are scored again without the bound. */
            if (filled < k && filled < seen) {
                filled = 0;
                for (int32_t s = 0; s < count[lane]; s++)
                    score_block(item, cate, d, poscol, hist_item, hist_cate, n, max_position, qi, list[s], -INFINITY,
                                best, &filled, k);
            }
            float total = 0.0f;
            for (int64_t i = 0; i < filled; i++) total += expf(best[i].score - best[0].score);
            if (total < FLT_MIN) total = FLT_MIN;
            for (int64_t i = 0; i < k; i++) {
                out_index[c * k + i] = i < filled ? best[i].index : -1;
                out_weight[c * k + i] = i < filled ? expf(best[i].score - best[0].score) / total : 0.0f;
            }
        }
    }
}

#else
static int cpu_ok(void) { return 0; }
#endif /* DARE_X86 */

/* Scratch memory, kept per thread between calls (the service scores on a small pool of worker threads): fresh
 * multi-megabyte allocations per call would page-fault on every call. Freed when the thread exits (anyio retires
 * idle worker threads), and not kept past a call when larger than SCRATCH_KEEP_BYTES (a rare huge request). */
#define SCRATCH_SLOTS 8
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
             ((kind == 'f' && f[0] == 'f') || (kind == 'i' && (f[0] == 'q' || f[0] == 'l')));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s", name, kind == 'f' ? "float32" : "int64");
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
    PyObject *o[11];
    double scale;
    long long d, max_position, k;
    if (!PyArg_ParseTuple(args, "OOOLOOOOdLLOO", &o[0], &o[1], &o[2], &d, &o[3], &o[4], &o[5], &o[6], &scale,
                          &max_position, &k, &o[7], &o[8]))
        return NULL;
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512F/FMA, which the fused search needs");
        return NULL;
    }
    static const char *names[9] = {"item_table", "cate_table", "position_column", "hist_item", "hist_cate",
                                   "cand_item",  "cand_cate",  "out_index",       "out_weight"};
    static const char kinds[9] = {'f', 'f', 'f', 'i', 'i', 'i', 'i', 'i', 'f'};
    Buf b[9];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    float *qt = NULL, *query = NULL, *bmax = NULL, *bsecond = NULL, *zeros = NULL;
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
    const int64_t item_rows = count(&b[0]) / d, cate_rows = count(&b[1]) / d;
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
    Scratch *sc = scratch_of_thread();
    if (sc == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    qt = scratch_get(sc, 0, (size_t)tiles * 2 * d * CT * sizeof(float));
    query = scratch_get(sc, 1, (size_t)c_count * 2 * d * sizeof(float));
    bmax = scratch_get(sc, 2, (size_t)nb * tiles * CT * sizeof(float));
    zeros = scratch_get(sc, 3, (size_t)d * sizeof(float));
    top = scratch_get(sc, 4, (size_t)tiles * 2 * k * sizeof(v16));
    blocks = scratch_get(sc, 5, (size_t)16 * nb * sizeof(int32_t));
    bsecond = scratch_get(sc, 6, (size_t)nb * tiles * CT * sizeof(float));
    barg = scratch_get(sc, 7, (size_t)nb * tiles * CT);
    best = malloc((size_t)k * sizeof(Hit));
    if (!qt || !query || !bmax || !zeros || !top || !blocks || !bsecond || !barg || !best) {
        PyErr_NoMemory();
        goto done;
    }
    memset(zeros, 0, (size_t)d * sizeof(float));
    Py_BEGIN_ALLOW_THREADS;
    const float s = (float)scale;
    /* The scaled queries, row-major for pass 2 and packed [tile][2d][32] for pass 1 (padding candidates: 0). */
    memset(qt, 0, (size_t)tiles * 2 * d * CT * sizeof(float));
    for (int64_t c = 0; c < c_count; c++) {
        float *row = query + c * 2 * d;
        for (int64_t j = 0; j < d; j++) {
            row[j] = item[ci[c] * d + j] * s;
            row[d + j] = cate[cc[c] * d + j] * s;
        }
        float *packed = qt + (c / CT) * (2 * d * CT) + c % CT;
        for (int64_t j = 0; j < 2 * d; j++) packed[j * CT] = row[j];
    }
    block_maxima(item, cate, d, poscol, hi, hc, n, max_position, qt, tiles, k, bmax, bsecond, barg, top, zeros);
    exact_topk(item, cate, d, poscol, hi, hc, n, max_position, query, c_count, bmax, bsecond, barg, top, tiles, k, b[7].view.buf,
               b[8].view.buf, best, blocks);
    scratch_trim(sc);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    free(best);
    for (int i = 0; i < 9; i++)
        if (b[i].held) PyBuffer_Release(&b[i].view);
    return result;
}
#else
static PyObject *py_search(PyObject *self, PyObject *args) {
    PyErr_SetString(PyExc_RuntimeError, "the fused search needs an x86-64 CPU with AVX-512F");
    return NULL;
}
#endif

static PyObject *py_supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_ok()); }

static PyMethodDef methods[] = {
    {"search", py_search, METH_VARARGS,
     "search(item_table, cate_table, position_column, d, hist_item, hist_cate, cand_item, cand_cate, scale, "
     "max_position, k, out_index, out_weight) -> None: the fused search of one user (see service/search.py)."},
    {"supported", py_supported, METH_NOARGS, "supported() -> bool: this CPU has the instructions the kernel needs."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_search", "The fused DARE search kernel.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__search(void) { return PyModule_Create(&module); }
