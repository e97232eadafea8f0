/* Tile sums into fp32 totals (scales and zero points), and totals into bf16 outputs.
 * Part of cpu_amx.c, which includes it after its types and constants. */

static const float PLANE_UNIT[2] = {1.0f, 1.0f / PLANE_BASE};

/* Whether a fold's sums start (and the previous fold's end) at input row k: at every block, and
 * every CARRY_K rows within longer blocks, so that int32 sums stay far from 2^31 (8-bit codes:
 * |sum| <= 128 * 255 * 8192 < 2^28). */
#define CARRY_K 8192
static inline int fold_starts(const act_t *a, int64_t k) { return k % a->block == 0 || k % CARRY_K == 0; }

/* Whether the fold holding input row k began at its block's start: that fold takes the block's
 * zero-point term (once a block). */
static inline int fold_holds_block_start(const act_t *a, int64_t k) {
  return k / a->block * a->block >= k / CARRY_K * CARRY_K;
}

/* Digit sums of `rows` rows (plane 0 at sums + row_step * r, plane 1 16 further... or 256 further for
 * plane-major tiles: `plane_step`) into fp32 totals, with the block's zero-point term when `sz` is
 * given (`xsum`: the rows' block sums of x, `nblocks` apart). The same arithmetic for either layout,
 * so that a row's result does not depend on the batch. */
static inline void fold_planes(const int32_t *sums, int64_t row_step, __m512 scale, __m512 sz, const float *xsum,
                               int64_t nblocks, float *totals, int64_t rows) {
  const int64_t plane_step = row_step == 16 ? 256 : 16;
  const __m512 unit = _mm512_set1_ps(PLANE_UNIT[1]);
  for (int64_t r = 0; r < rows; r++) {
    const int32_t *row = sums + row_step * r;
    __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(row));
    v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(row + plane_step)), unit, v);
    const __m512 t = _mm512_fmadd_ps(scale, v, _mm512_load_ps(totals + 16 * r));
    _mm512_store_ps(totals + 16 * r, _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[r * nblocks]), t));
  }
}

/* Output rows m0 .. m0 + rows - 1 of panel n from their totals: y = s_m * totals. */
static void write_outputs(const act_t *a, const weight_t *wt, const float *totals, int64_t m0, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; r++) {
    const __m512 y = _mm512_mul_ps(_mm512_set1_ps(a->scale[m0 + r]), _mm512_load_ps(totals + 16 * r));
    _mm256_storeu_si256((__m256i *)(wt->out + (m0 + r) * wt->N + n * 16), (__m256i)_mm512_cvtneps_pbh(y));
  }
}
