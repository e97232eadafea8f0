/* Rows of x into A tiles: block sums, row scales, digit planes or bf16 copies.
 * Part of cpu_amx.c, which includes it after its types and constants. */

/* 32 bf16 values as two fp32 vectors: even-indexed values and odd-indexed ones. */
static inline void load_x32(const uint16_t *p, __m512 *even, __m512 *odd) {
  const __m512i v = _mm512_loadu_si512((const void *)p);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* Row m's scale: for digits s = max|x| / 127 (not below 2^-120, so that 1 / s stays finite), for
 * bf16 1 and its block sums of x (the digit path sums its digits instead: write_row). */
static void measure_row(const uint16_t *row, const act_t *a, int64_t m) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0; /* max drops NaNs: they are looked for apart */
  const int64_t nblocks = a->K / a->block;
  float *xsum = a->xsum + m * nblocks;
  for (int64_t b = 0; b < nblocks; b++) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = b * a->block; k < (b + 1) * a->block; k += 32) {
      __m512 even, odd;
      load_x32(row + k, &even, &odd);
      if (!a->digits) sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
      mx = _mm512_max_ps(mx, _mm512_max_ps(_mm512_abs_ps(even), _mm512_abs_ps(odd)));
      nan |= _mm512_cmp_ps_mask(even, odd, _CMP_UNORD_Q);
    }
    if (!a->digits) xsum[b] = _mm512_reduce_add_ps(sum);
  }
  float s = 1.0f;
  const float amax = _mm512_reduce_max_ps(mx);
  if (a->digits && (nan || !(amax <= FLT_MAX))) {
    s = NAN; /* inf or NaN in the row: its outputs are NaN, as a dense matmul's would be */
  } else if (a->digits && amax > 0) {
    s = amax / 127.0f;
    if (s < 0x1p-120f) s = 0x1p-120f;
  }
  a->scale[m] = s;
}

/* Digits of 64 values (even/odd-indexed halves of x[0..31] and x[32..63], already divided by s)
 * as int8, in order: d0 = round(v), d1 = round(256 (v - d0)) (at most 127); and the digit sums of
 * each 32 values in units of 1/256 (sum[0]: x[0..31], sum[1]: x[32..63], 16 lanes to add up). */
static inline void digits64(const __m512 v[4], __m512i *d0, __m512i *d1, __m512i sum[2]) {
  /* packs interleave per 128-bit lane: lane l holds x[8l + 0, 2, 4, 6], x[8l + 1, 3, 5, 7], then the same 32 on */
  const __m512i order = _mm512_set_epi8(63, 59, 62, 58, 61, 57, 60, 56, 47, 43, 46, 42, 45, 41, 44, 40,
                                        31, 27, 30, 26, 29, 25, 28, 24, 15, 11, 14, 10, 13, 9, 12, 8,
                                        55, 51, 54, 50, 53, 49, 52, 48, 39, 35, 38, 34, 37, 33, 36, 32,
                                        23, 19, 22, 18, 21, 17, 20, 16, 7, 3, 6, 2, 5, 1, 4, 0);
  __m512i q0[4], q1[4];
  for (int i = 0; i < 4; i++) {
    q0[i] = _mm512_cvtps_epi32(v[i]); /* round to nearest even */
    const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v[i], _mm512_cvtepi32_ps(q0[i])), _mm512_set1_ps(PLANE_BASE));
    q1[i] = _mm512_min_epi32(_mm512_cvtps_epi32(rest), _mm512_set1_epi32(127)); /* rest <= 128 */
  }
  for (int h = 0; h < 2; h++)
    sum[h] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(q0[2 * h], q0[2 * h + 1]), 8), _mm512_add_epi32(q1[2 * h], q1[2 * h + 1]));
  *d0 = _mm512_permutexvar_epi8(order, _mm512_packs_epi16(_mm512_packs_epi32(q0[0], q0[1]), _mm512_packs_epi32(q0[2], q0[3])));
  *d1 = _mm512_permutexvar_epi8(order, _mm512_packs_epi16(_mm512_packs_epi32(q1[0], q1[1]), _mm512_packs_epi32(q1[2], q1[3])));
}

/* Row m into the A tiles: its two digit planes, or its bf16 values as they are. */
static void write_row(const uint16_t *row, const act_t *a, int64_t m) {
  const int64_t t = m / a->per_tile, r = (m % a->per_tile) * a->planes;
  if (!a->digits) {
    uint16_t *dst = (uint16_t *)a->xa + t * a->rows * a->K + r * 32;
    for (int64_t k0 = 0; k0 < a->K; k0 += 32, dst += a->rows * 32)
      _mm512_storeu_si512((__m512i *)dst, _mm512_loadu_si512((const __m512i *)(row + k0)));
    return;
  }
  const __m512 inv = _mm512_set1_ps(1.0f / a->scale[m]);
  const int64_t kc = a->kc;
  /* plane-major: [K / kc][plane][row][kc]; else [tile][K / kc][row and plane][kc] */
  const int64_t chunk_step = a->plane_major ? PLANES * a->rows * kc : a->rows * kc;
  const int64_t plane_step = a->plane_major ? a->rows * kc : kc;
  int8_t *dst = (int8_t *)a->xa + (a->plane_major ? m * kc : t * a->rows * a->K + r * kc);
  /* the block sums of x as the digits give it (so that the zero points cancel what the products
   * hold; |sum| < 2^31 for blocks up to 65000 rows), in units of s */
  float *xsum = a->xsum + m * (a->K / a->block);
  __m512i block_sum = _mm512_setzero_si512();
  int64_t left = a->block;
  for (int64_t k0 = 0; k0 < a->K; k0 += 64) {
    const int tail = a->K - k0 == 32; /* K = 32 mod 64 (then kc = 32): the last 32 values alone */
    __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    load_x32(row + k0, &v[0], &v[1]);
    if (!tail) load_x32(row + k0 + 32, &v[2], &v[3]);
    for (int i = 0; i < 4; i++) v[i] = _mm512_mul_ps(v[i], inv);
    __m512i d0, d1, sum[2];
    digits64(v, &d0, &d1, sum);
    for (int h = 0; h < 2 - tail; h++) { /* blocks are multiples of 32 rows */
      block_sum = _mm512_add_epi32(block_sum, sum[h]);
      if ((left -= 32) == 0) {
        *xsum++ = (float)_mm512_reduce_add_epi32(block_sum) / PLANE_BASE;
        block_sum = _mm512_setzero_si512();
        left = a->block;
      }
    }
    int8_t *at = dst + k0 / kc * chunk_step;
    if (kc == 64) {
      _mm512_storeu_si512((void *)at, d0);
      _mm512_storeu_si512((void *)(at + plane_step), d1);
    } else { /* kc = 32: the two halves are consecutive chunks */
      _mm256_storeu_si256((__m256i *)at, _mm512_castsi512_si256(d0));
      _mm256_storeu_si256((__m256i *)(at + plane_step), _mm512_castsi512_si256(d1));
      if (tail) break;
      _mm256_storeu_si256((__m256i *)(at + chunk_step), _mm512_extracti64x4_epi64(d0, 1));
      _mm256_storeu_si256((__m256i *)(at + chunk_step + plane_step), _mm512_extracti64x4_epi64(d1, 1));
    }
  }
}
