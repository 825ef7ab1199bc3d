/* The fused search kernel's body, included twice by service/_search.c: with KISA 512 (AVX-512F) and KISA 256
 * (AVX2 + FMA), each copy compiled for its instruction set and named by KFN. Both compute the same pass-1 scores
 * (each lane sums the same products in the same order), so they retrieve the same events; pass 2's rescoring sums
 * in another order on each. See _search.c for what the passes do. */

/* GROUP: blocks per pass over the candidate tiles in pass 1 (they share each tile's packed queries while those are
 * in L1). The AVX-512 code was tuned with 4 on the AVX-512 machines of rounds 5 and 6; one block per pass was 1.32x
 * as fast at N = 10,000 and att 16 on an AVX2-only EPYC (Zen 3, round 7, docs/bench/kernel_ab_group.md) and 1.20x
 * with AVX-512 on an EPYC Zen 5 (round 8, a scratch A/B: docs/performance.md), 1.04x at att 128 on both. */
#define GROUP 1
#if KISA == 512
#define KTARGET __attribute__((target("avx512f,fma")))
#define KFN(x) x##_avx512
#else
#define KTARGET __attribute__((target("avx2,fma")))
#define KFN(x) x##_avx2
#endif
#define KINLINE KTARGET __attribute__((always_inline)) static inline

/* -------------------------------------------------------------------------------- instruction-set helpers */

#if KISA == 512
KINLINE unsigned KFN(mask_gt)(const float *a, const float *b) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(a), _mm512_loadu_ps(b), _CMP_GT_OQ);
}
KINLINE unsigned KFN(mask_ge)(const float *a, const float *b) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(a), _mm512_loadu_ps(b), _CMP_GE_OQ);
}
#else
/* 16 lanes as two 8-float halves, read from memory: 16-float vector values are never formed here (GCC would split
 * them through the stack). */
KINLINE unsigned KFN(mask_gt)(const float *a, const float *b) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), _CMP_GT_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8), _CMP_GT_OQ)) << 8;
}
KINLINE unsigned KFN(mask_ge)(const float *a, const float *b) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), _CMP_GE_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8), _CMP_GE_OQ)) << 8;
}
#endif

#if KISA == 512
/* The AVX-512 tile for `halves` (a constant 1 or 2 where it is inlined) 16-candidate halves. */
KINLINE void KFN(tile_halves)(const float *const *ir, const float *const *cr, const float *q, const float *qc,
                              int64_t d, const int halves, v16 a[TT][2]) {
    const float *const *rows[2] = {ir, cr}; /* the item products first, then the category products */
    const float *queries[2] = {q, qc};
    for (int r = 0; r < TT; r++) a[r][0] = a[r][1] = (v16){0};
    for (int part = 0; part < 2; part++) {
        const float *const *row = rows[part], *qp = queries[part];
        for (int64_t j = 0; j < d; j++) {
            v16 q0 = *(const v16 *)(qp + j * CT), q1 = *(const v16 *)(qp + j * CT + 16);
#pragma GCC unroll 8
            for (int r = 0; r < TT; r++) {
                float h = row[r][j];
                a[r][0] += h * q0;
                if (halves == 2) a[r][1] += h * q1;
            }
        }
    }
}
#endif

/* One tile: a[r][v] = the scores of the 8 events (rows ir[r], cr[r]) for candidates 16v..16v+15 of the tile
 * (packed queries q, qc: [d][32] each), without the position part. With halves = 1 (a last tile that holds 16
 * candidates or fewer) candidates 16..31 are skipped and left at zero. Each lane: the item products over j, then
 * the category products over j, each added with one fused multiply-add. */
KINLINE void KFN(tile)(const float *const *ir, const float *const *cr, const float *q, const float *qc,
                                     int64_t d, int halves, v16 a[TT][2]) {
#if KISA == 512
    if (halves == 2)
        KFN(tile_halves)(ir, cr, q, qc, d, 2, a);
    else
        KFN(tile_halves)(ir, cr, q, qc, d, 1, a);
#else
    const float *const *rows[2] = {ir, cr}; /* the item products first, then the category products */
    const float *queries[2] = {q, qc};
    /* 4 events x 16 candidates at a time (8 accumulators), four times: each step loads two query vectors and
     * broadcasts four row values for eight FMAs. (8 events x 8 candidates, as many accumulators, broadcast eight
     * row values per query vector: the loads, not the FMAs, bound that tile.) */
    float *out = (float *)a; /* [TT][32] */
    for (int eh = 0; eh < TT / 4; eh++) {
        for (int ch = 0; ch < 2; ch++) {
            if (ch >= halves) { /* no candidates there */
                for (int r = 0; r < 4; r++) memset(out + (4 * eh + r) * CT + 16 * ch, 0, 16 * sizeof(float));
                continue;
            }
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int part = 0; part < 2; part++) {
                const float *const *row = rows[part] + 4 * eh, *qp = queries[part] + 16 * ch;
                for (int64_t j = 0; j < d; j++) {
                    __m256 q0 = _mm256_load_ps(qp + j * CT), q1 = _mm256_load_ps(qp + j * CT + 8);
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) {
                        __m256 h = _mm256_broadcast_ss(row[r] + j);
                        acc[r][0] = _mm256_fmadd_ps(h, q0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(h, q1, acc[r][1]);
                    }
                }
            }
            for (int r = 0; r < 4; r++) {
                _mm256_storeu_ps(out + (4 * eh + r) * CT + 16 * ch, acc[r][0]);
                _mm256_storeu_ps(out + (4 * eh + r) * CT + 16 * ch + 8, acc[r][1]);
            }
        }
    }
#endif
}

/* From one tile's scores (a, without the position part) and the events' positions: per candidate, the block's best
 * score, its offset in the block (the first of equal ones) and its second best (equal to the best on a tie),
 * stored at max, second and arg (32 candidates each; the AVX2 code only the first 16 when halves = 1). */
KINLINE void KFN(epilogue)(v16 a[TT][2], const int *valid, const float *pos, int halves, float *max, float *second,
                           uint8_t *arg) {
#if KISA == 512
    __m512 best[2], sec[2];
    __m512i at[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    best[0] = best[1] = sec[0] = sec[1] = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 8
    for (int r = 0; r < TT; r++) {
        if (!valid[r]) continue;
        const __m512 p = _mm512_set1_ps(pos[r]);
        for (int v = 0; v < 2; v++) {
            __m512 x = _mm512_add_ps((__m512)a[r][v], p);
            __mmask16 gt = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
            sec[v] = _mm512_max_ps(sec[v], _mm512_min_ps(best[v], x));
            best[v] = _mm512_max_ps(best[v], x);
            at[v] = _mm512_mask_mov_epi32(at[v], gt, _mm512_set1_epi32(r));
        }
    }
    (void)halves; /* both halves: a loop bound known only at run time cost the AVX-512 code more than it saved */
    for (int v = 0; v < 2; v++) {
        _mm512_store_ps(max + 16 * v, best[v]);
        _mm512_store_ps(second + 16 * v, sec[v]);
        _mm_storeu_si128((__m128i *)(arg + 16 * v), _mm512_cvtepi32_epi8(at[v]));
    }
#else
    const float *s = (const float *)a; /* [TT][32], written by the AVX2 tile */
    for (int h = 0; h < 2 * halves; h++) { /* 8 candidates at a time */
        __m256 best = _mm256_set1_ps(-INFINITY), sec = best, at = _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < TT; r++) {
            if (!valid[r]) continue;
            __m256 x = _mm256_add_ps(_mm256_loadu_ps(s + r * CT + 8 * h), _mm256_set1_ps(pos[r]));
            __m256 gt = _mm256_cmp_ps(x, best, _CMP_GT_OQ);
            sec = _mm256_max_ps(sec, _mm256_min_ps(best, x));
            best = _mm256_max_ps(best, x);
            at = _mm256_blendv_ps(at, _mm256_castsi256_ps(_mm256_set1_epi32(r)), gt);
        }
        _mm256_storeu_ps(max + 8 * h, best);
        _mm256_storeu_ps(second + 8 * h, sec);
        __m128i lo = _mm256_castsi256_si128(_mm256_castps_si256(at)), hi = _mm256_extracti128_si256(_mm256_castps_si256(at), 1);
        __m128i w = _mm_packus_epi32(lo, hi); /* 8 x uint16 */
        _mm_storel_epi64((__m128i *)(arg + 8 * h), _mm_packus_epi16(w, w));
    }
#endif
}

/* <q_item, item_row> + <q_cate, cate_row>, in four independent accumulators (one chain would be bound by the FMA
 * latency, not its throughput). */
KINLINE float KFN(dot2)(const float *qi, const float *ri, const float *qc, const float *rc, int64_t d) {
#if KISA == 512
#define VW 16
#define V __m512
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#else
#define VW 8
#define V __m256
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#endif
    V a0 = VZERO(), a1 = VZERO(), a2 = VZERO(), a3 = VZERO();
    int64_t j = 0;
    for (; j + 2 * VW <= d; j += 2 * VW) {
        a0 = VFMA(VLOAD(qi + j), VLOAD(ri + j), a0);
        a1 = VFMA(VLOAD(qc + j), VLOAD(rc + j), a1);
        a2 = VFMA(VLOAD(qi + j + VW), VLOAD(ri + j + VW), a2);
        a3 = VFMA(VLOAD(qc + j + VW), VLOAD(rc + j + VW), a3);
    }
#undef VW
#undef V
#undef VZERO
#undef VLOAD
#undef VFMA
#if KISA == 512
    for (; j < d; j += 16) { /* masked loads for a d that is not a multiple of 16 */
        __mmask16 m = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qi + j), _mm512_maskz_loadu_ps(m, ri + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qc + j), _mm512_maskz_loadu_ps(m, rc + j), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    __m256 s8 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; j < d; j++) s += qi[j] * ri[j] + qc[j] * rc[j];
    return s;
#endif
}

/* ---------------------------------------------------------------- pass 1: block maxima and their K-th largest */

/* Per candidate lane, `top` holds the K largest block maxima so far, in descending order (top[K-1] = the K-th);
 * insert the 16 values at x. */
KINLINE void KFN(insert_max)(v16 *top, int64_t k, const float *x) {
    if (!KFN(mask_gt)(x, (const float *)&top[k - 1])) return;
#if KISA == 512
    __m512 v = _mm512_loadu_ps(x);
    for (int64_t i = 0; i < k; i++) {
        __m512 t = (__m512)top[i];
        top[i] = (v16)_mm512_max_ps(t, v);
        v = _mm512_min_ps(t, v);
    }
#else
    for (int h = 0; h < 2; h++) {
        __m256 v = _mm256_loadu_ps(x + 8 * h);
        for (int64_t i = 0; i < k; i++) {
            float *t = (float *)&top[i] + 8 * h;
            __m256 tv = _mm256_loadu_ps(t);
            _mm256_storeu_ps(t, _mm256_max_ps(tv, v));
            v = _mm256_min_ps(tv, v);
        }
    }
#endif
}

KTARGET static void KFN(block_maxima)(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *qt, int64_t tiles, int64_t k,
    float *bmax /* [nb][tiles * 32] */, float *bsecond, uint8_t *barg, v16 *top /* [tiles * 2][k] */,
    const float *zeros, int last_halves /* 16-candidate halves of the last tile that hold candidates: 1 or 2 */) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    const int64_t lines = (d * 4 + 63) / 64;
    for (int64_t i = 0; i < tiles * 2 * k; i++)
        for (int l = 0; l < 16; l++) top[i][l] = -INFINITY;
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
                const int halves = ct == tiles - 1 ? last_halves : 2;
                KFN(tile)(ir, cr, q, qc, d, halves, a);
                /* Per candidate: the block's best score, its offset in the block (the first of equal ones), and
                 * the second best (equal to the best on a tie), which says whether the block can hold two of the
                 * candidate's K best. */
                const int64_t o = (b * tiles + ct) * CT;
                KFN(epilogue)(a, valid[b - b0], pos[b - b0], halves, bmax + o, bsecond + o, barg + o);
                KFN(insert_max)(top + (2 * ct) * k, k, bmax + o);
                if (halves == 2) KFN(insert_max)(top + (2 * ct + 1) * k, k, bmax + o + 16);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------- pass 2: exact top-K */

/* Score block b's events for one candidate (query q = [scale * item, scale * cate]) and offer them; returns how
 * many events it scored. */
KTARGET static int64_t KFN(score_block)(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *q, int64_t b, float bound, Hit *best,
    int64_t *filled, int64_t k) {
    const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
    for (int64_t t = b * BLOCK; t < end; t++) {
        const int64_t p = n - t;
        offer(best, filled, k, bound,
              (Hit){KFN(dot2)(q, item + hist_item[t] * d, q + d, cate + hist_cate[t] * d, d) +
                        poscol[p < max_position ? p : max_position],
                    t});
    }
    return end - b * BLOCK;
}

KTARGET static void KFN(exact_topk)(
    const float *item, const float *cate, int64_t d, const float *poscol, const int64_t *hist_item,
    const int64_t *hist_cate, int64_t n, int64_t max_position, const float *query /* [C][2d] */, int64_t c_count,
    const float *bmax, const float *bsecond, const uint8_t *barg, const v16 *top, int64_t tiles, int64_t k, int64_t *out_index, float *out_weight, Hit *best,
    int32_t *blocks /* [16][nb] */, const float *slack /* [tiles * 32]: pass 1's error bound per candidate, or NULL */) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    for (int64_t cv = 0; cv < tiles * 2 && cv * 16 < c_count; cv++) { /* a last half without candidates: none */
        /* For these 16 candidates, the blocks whose maximum reaches the candidate's K-th largest block maximum
         * (at least K of them, all of them when there are fewer than K). */
        int32_t count[16] = {0};
        /* With approximate pass-1 scores (within slack of the exact ones), a block can hold one of the K best only if
         * its maximum reaches the K-th largest maximum less twice the slack. */
        float sel[16] __attribute__((aligned(64)));
        for (int lane = 0; lane < 16; lane++)
            sel[lane] = top[cv * k + k - 1][lane] - (slack ? 2.0f * slack[cv * 16 + lane] : 0.0f);
        for (int64_t b = 0; b < nb; b++) {
            unsigned m = KFN(mask_ge)(bmax + b * tiles * CT + cv * 16, sel);
            if (m) { /* the selected blocks' second bests and offsets are read below: fetch them now */
                __builtin_prefetch(bsecond + b * tiles * CT + cv * 16);
                __builtin_prefetch(barg + b * tiles * CT + cv * 16);
            }
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
            const float thr = sel[lane];
            const int32_t *list = blocks + lane * nb;
            const int64_t col = (cv / 2) * CT + (cv % 2) * 16 + lane, stride = tiles * CT;
            int64_t filled = 0, seen = 0; /* best[0..filled) sorted, best first */
            /* A selected block whose second best is below thr holds one of the K best at most: its best, whose
             * score and offset pass 1 kept. The others (and every block when there are fewer than K) are scored
             * again event by event. */
            for (int32_t s = 0; s < count[lane]; s++) {
                const int64_t b = list[s];
                if (bsecond[b * stride + col] < thr) {
                    const int64_t t = b * BLOCK + barg[b * stride + col], p = n - t;
                    /* With approximate pass-1 scores (slack), that one event is scored again. */
                    const float score = slack ? KFN(dot2)(qi, item + hist_item[t] * d, qi + d, cate + hist_cate[t] * d, d) +
                                                    poscol[p < max_position ? p : max_position]
                                              : bmax[b * stride + col];
                    offer(best, &filled, k, thr, (Hit){score, t});
                    seen++;
                    continue;
                }
                seen += KFN(score_block)(item, cate, d, poscol, hist_item, hist_cate, n, max_position, qi, b, thr, best, &filled, k);
            }
            /* Rescored events are summed in another order than pass 1's, so one can land a rounding error below
             * thr; if that leaves fewer than K, the candidate's blocks are scored again without the bound. */
            if (filled < k && filled < seen) {
                filled = 0;
                for (int32_t s = 0; s < count[lane]; s++)
                    KFN(score_block)(item, cate, d, poscol, hist_item, hist_cate, n, max_position, qi, list[s], -INFINITY,
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


#undef KINLINE
#undef KTARGET
#undef KFN
#undef GROUP
