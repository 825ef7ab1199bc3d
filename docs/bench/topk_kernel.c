/* Exact per-row top-K + softmax over [C, N] attention scores: the compiled top-K measured (and not shipped) by
 * docs/bench/tried_round4.py. Build: gcc -O3 -shared -fPIC -o libtopk.so topk_kernel.c -lm
 *
 * Per row: (1) the maximum of each block of BLK scores (AVX2, four accumulators); (2) the K-th largest block maximum
 * is a lower bound of the K-th largest score (K distinct scores reach it), found by insertion into K sorted slots;
 * (3) only blocks whose maximum reaches the bound are scanned again, and their scores that reach it are inserted into
 * the K best (ties: the smaller index first); (4) weights = softmax of the K best, -1 / 0 padding when N < K.
 * This is the same answer search.onnx gives (index and weight), checked by the script on every case it times.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define BLK 128 /* 128 measured fastest of {32, 64, 128, 256} */

typedef struct {
    float v;
    int64_t i;
} pair_t;

static inline int better(float va, int64_t ia, float vb, int64_t ib) { return va > vb || (va == vb && ia < ib); }

/* Insert (v, i) into top[0..*cnt) kept sorted best first, at most k long. */
static inline void insert_sorted(pair_t *top, int64_t *cnt, int64_t k, float v, int64_t i) {
    int64_t c = *cnt;
    if (c == k) {
        if (!better(v, i, top[k - 1].v, top[k - 1].i)) return;
        c = k - 1;
    }
    int64_t p = c;
    while (p > 0 && better(v, i, top[p - 1].v, top[p - 1].i)) {
        top[p] = top[p - 1];
        p--;
    }
    top[p].v = v;
    top[p].i = i;
    *cnt = c + 1;
}

static void block_max_scalar(const float *x, int64_t nb, float *out) {
    for (int64_t b = 0; b < nb; b++) {
        float m = x[b * BLK];
        for (int j = 1; j < BLK; j++) m = x[b * BLK + j] > m ? x[b * BLK + j] : m;
        out[b] = m;
    }
}

static void collect_scalar(const float *p, float thr, int64_t base, pair_t *top, int64_t *cnt, int64_t k) {
    for (int j = 0; j < BLK; j++)
        if (p[j] >= thr) insert_sorted(top, cnt, k, p[j], base + j);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void block_max_avx2(const float *x, int64_t nb, float *out) {
    for (int64_t b = 0; b < nb; b++) {
        const float *p = x + b * BLK;
        __m256 m0 = _mm256_loadu_ps(p), m1 = _mm256_loadu_ps(p + 8), m2 = _mm256_loadu_ps(p + 16), m3 = _mm256_loadu_ps(p + 24);
        for (int j = 32; j < BLK; j += 32) {
            m0 = _mm256_max_ps(m0, _mm256_loadu_ps(p + j));
            m1 = _mm256_max_ps(m1, _mm256_loadu_ps(p + j + 8));
            m2 = _mm256_max_ps(m2, _mm256_loadu_ps(p + j + 16));
            m3 = _mm256_max_ps(m3, _mm256_loadu_ps(p + j + 24));
        }
        __m256 m = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
        __m128 a = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
        out[b] = _mm_cvtss_f32(a);
    }
}

__attribute__((target("avx2"))) static void collect_avx2(const float *p, float thr, int64_t base, pair_t *top, int64_t *cnt, int64_t k) {
    __m256 t = _mm256_set1_ps(thr);
    for (int j = 0; j < BLK; j += 8) {
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), t, _CMP_GE_OQ));
        while (mask) {
            int q = j + __builtin_ctz(mask);
            insert_sorted(top, cnt, k, p[q], base + q);
            mask &= mask - 1;
        }
    }
}
#endif

/* scores [c, n] row-major float32 -> out_index [c, k] int64 (best first, -1 padding), out_weight [c, k] float32.
 * Returns 0, or -1 when k is out of range or memory runs out. */
int topk_softmax(const float *scores, int64_t c, int64_t n, int64_t k, int64_t *out_index, float *out_weight) {
    if (k < 1 || k > 4096) return -1;
    void (*block_max)(const float *, int64_t, float *) = block_max_scalar;
    void (*collect)(const float *, float, int64_t, pair_t *, int64_t *, int64_t) = collect_scalar;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) {
        block_max = block_max_avx2;
        collect = collect_avx2;
    }
#endif
    int64_t nb = n / BLK;
    float *maxima = malloc(sizeof(float) * (size_t)(nb + k + 1));
    pair_t *top = malloc(sizeof(pair_t) * (size_t)k);
    if (maxima == NULL || top == NULL) {
        free(maxima);
        free(top);
        return -1;
    }
    float *best_max = maxima + nb; /* k slots */
    for (int64_t r = 0; r < c; r++) {
        const float *x = scores + r * n;
        int64_t cnt = 0;
        if (nb >= k) {
            block_max(x, nb, maxima);
            int64_t w = 0; /* the k largest block maxima, sorted: the last is the bound */
            for (int64_t b = 0; b < nb; b++) {
                float v = maxima[b];
                if (w == k) {
                    if (v <= best_max[k - 1]) continue;
                    w = k - 1;
                }
                int64_t p = w;
                while (p > 0 && v > best_max[p - 1]) {
                    best_max[p] = best_max[p - 1];
                    p--;
                }
                best_max[p] = v;
                w++;
            }
            float bound = best_max[k - 1];
            for (int64_t b = 0; b < nb; b++)
                if (maxima[b] >= bound) collect(x + b * BLK, bound, b * BLK, top, &cnt, k);
            for (int64_t j = nb * BLK; j < n; j++)
                if (x[j] >= bound) insert_sorted(top, &cnt, k, x[j], j);
        } else {
            for (int64_t j = 0; j < n; j++) insert_sorted(top, &cnt, k, x[j], j);
        }
        int64_t *oi = out_index + r * k;
        float *ow = out_weight + r * k;
        float first = cnt ? top[0].v : 0.f, sum = 0.f;
        for (int64_t j = 0; j < cnt; j++) {
            ow[j] = expf(top[j].v - first);
            sum += ow[j];
            oi[j] = top[j].i;
        }
        for (int64_t j = 0; j < cnt; j++) ow[j] /= sum;
        for (int64_t j = cnt; j < k; j++) {
            ow[j] = 0.f;
            oi[j] = -1;
        }
    }
    free(maxima);
    free(top);
    return 0;
}
