/* Weight-only quantized GEMM on x86 AMX: y[M, N] = x[M, K] (bf16) @ W^T with 4- or 8-bit codes.
 *
 * Why it is fast: AMX multiplies int8 by uint8 with int32 sums (TDPBSUD), so 8-bit codes go from
 * memory straight into tiles, and 4-bit codes need one AND (and a shift) per byte to become them.
 * The activations become integers exactly enough: each row m is a power-of-two scale s_m times
 * planes of int8 digits,
 *     x[m, k] = s_m * (d0 + d1 / 128 + d2 / 16384),   |x| <= 127 s_m,
 * two planes for most rows (error <= s_m / 256 per element, about 2^-14 of the row's largest
 * magnitude) and a third for rows whose largest element exceeds 64 times their mean magnitude
 * (outlier channels), decided per row, so that a row's result does not depend on the batch it
 * came in. The planes are extra rows of the A tile: at M = 1 they cost nothing, as AMX tiles have
 * 16 rows anyway.
 *
 * Per quantization block the int32 tile sums are exact; the block's scale is applied to them in
 * fp32 and the zero point comes out through the block sums of x:
 *     y[m, n] = s_m * sum_b s[b, n] * C_b[m, n] - sum_b s[b, n] z[b, n] * sum_{k in b} x[m, k]
 * (`scale_zero` = s * z is precomputed at load).
 *
 * Packed weight, per panel of 16 output columns and chunk of kc input rows (kc = 64, or 32 for
 * 32-row blocks), in AMX's B-tile layout (tile row i, column n, byte p holds k = 4i + p):
 *   8-bit: kc * 16 bytes, the tile itself;
 *   4-bit: kc * 8 bytes, byte j holds tile byte j (low nibble) and tile byte kc * 8 + j (high).
 * Scales: float32 [N / 16][K / block][16] for s and for s * z.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PREFETCH_AHEAD 4     /* chunks, into L1: measured best (2-16 ahead, into L1 or L2 only tried) */
#define OUTLIER_RATIO 64.0f  /* max|x| / mean|x| above which a row takes three planes */

/* Linux gives AMX's tile state to a process only on request; 1 on success. */
int qs_amx_init(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Tiles: 0, 7 = activation planes (A, rows x kc bytes); 1, 2 = weight chunks (B, kc / 4 rows);
 * 3..6 = int32 sums (C), one per (row tile, panel) pair of the work item. */
static void configure_tiles(int rows, int kc) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) {
    const int is_b = t == 1 || t == 2, is_a = t == 0 || t == 7;
    cfg.rows[t] = is_b ? kc / 4 : rows;
    cfg.colsb[t] = is_a ? kc : 64;
  }
  _tile_loadconfig(&cfg);
}

/* ---- activations: planes, block sums and where each row sits in the A tiles ---- */

typedef struct {
  int64_t M, K, block, kc;
  int rows;              /* rows configured per A tile: 16, or fewer when everything fits one */
  int64_t tiles;         /* A tiles (row tiles) */
  float *xsum;           /* [M][K / block] */
  float *scale;          /* [M] s_m */
  int32_t *first_row;    /* [M] row of plane 0 within its tile */
  int32_t *planes;       /* [M] 2 or 3 */
  int32_t *tile_of;      /* [M] */
  int32_t *tile_m0;      /* [tiles + 1] first row of x in each tile */
  int8_t *xq;            /* [tiles][K / kc][rows][kc] */
} act_t;

static inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __m512 load_x(const uint16_t *p) { return bf16_to_f32(_mm256_loadu_si256((const __m256i *)p)); }

/* Row statistics: block sums, scale and plane count. */
static void measure_row(const uint16_t *row, const act_t *a, int64_t m) {
  __m512 mx = _mm512_setzero_ps(), total = _mm512_setzero_ps();
  const int64_t nblocks = a->K / a->block;
  for (int64_t b = 0; b < nblocks; b++) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = b * a->block; k < (b + 1) * a->block; k += 16) {
      const __m512 v = load_x(row + k);
      s = _mm512_add_ps(s, v);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      total = _mm512_add_ps(total, _mm512_abs_ps(v));
    }
    a->xsum[m * nblocks + b] = _mm512_reduce_add_ps(s);
  }
  const float amax = _mm512_reduce_max_ps(mx), mean = _mm512_reduce_add_ps(total) / (float)a->K;
  float s = 1.0f; /* the power of two with 63.5 s < amax <= 127 s (not below 2^-120: 1 / s stays finite) */
  if (!(amax <= FLT_MAX)) {
    s = NAN; /* inf or NaN in the row: its outputs are NaN, as a dense matmul's would be */
  } else if (amax > 0) {
    while (amax > 127.0f * s) s *= 2.0f;
    while (amax <= 63.5f * s && s > 0x1p-120f) s *= 0.5f;
  }
  a->scale[m] = s;
  a->planes[m] = amax > OUTLIER_RATIO * mean ? 3 : 2;
}

/* Rows into tiles in order, a row's planes never split across two tiles. */
static void assign_tiles(act_t *a) {
  int64_t t = 0;
  int used = 0;
  a->tile_m0[0] = 0;
  for (int64_t m = 0; m < a->M; m++) {
    if (used + a->planes[m] > 16) {
      a->tile_m0[++t] = (int32_t)m;
      used = 0;
    }
    a->tile_of[m] = (int32_t)t;
    a->first_row[m] = used;
    used += a->planes[m];
  }
  a->tiles = t + 1;
  a->tile_m0[a->tiles] = (int32_t)a->M;
  a->rows = a->tiles == 1 ? used : 16;
}

/* Digits of row m: d = round-half-up(v), v <- (v - d) * 128 (in [-64, 64)); exact in fp32. */
static void write_planes(const uint16_t *row, const act_t *a, int64_t m) {
  const __m512 inv = _mm512_set1_ps(1.0f / a->scale[m]), f128 = _mm512_set1_ps(128.0f), half = _mm512_set1_ps(0.5f);
  const int64_t kc = a->kc, planes = a->planes[m];
  int8_t *dst = a->xq + (int64_t)a->tile_of[m] * a->rows * a->K + (int64_t)a->first_row[m] * kc;
  for (int64_t k0 = 0; k0 < a->K; k0 += kc, dst += a->rows * kc)
    for (int64_t k = 0; k < kc; k += 16) {
      __m512 v = _mm512_mul_ps(load_x(row + k0 + k), inv);
      for (int p = 0; p < planes; p++) {
        const __m512 d = _mm512_roundscale_ps(_mm512_add_ps(v, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + p * kc + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(d)));
        v = _mm512_mul_ps(_mm512_sub_ps(v, d), f128);
      }
    }
}

/* ---- the GEMM ---- */

static inline void unpack4(const uint8_t *src, int64_t kc, uint8_t *dst) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t half = kc * 8;
  for (int64_t i = 0; i < half; i += 64) {
    const __m512i v = _mm512_loadu_si512((const void *)(src + i));
    _mm512_store_si512((void *)(dst + i), _mm512_and_si512(v, low));
    _mm512_store_si512((void *)(dst + half + i), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

static inline void prefetch_chunk(const uint8_t *chunk, int64_t chunk_bytes) {
  const char *p = (const char *)chunk + PREFETCH_AHEAD * chunk_bytes;
  for (int64_t off = 0; off < chunk_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

/* Tile numbers must be constants, hence the switches. c: 0..3 (tile 3 + c); a: tile 0 or 7;
 * b: tile 1 or 2. */
#define DP(C, A, B) \
  case ((C - 3) * 4 + (A == 7) * 2 + (B - 1)): _tile_dpbsud(C, A, B); break
#define DP_ALL(C) DP(C, 0, 1); DP(C, 0, 2); DP(C, 7, 1); DP(C, 7, 2)

static inline void multiply(int c, int a, int b) {
  switch (c * 4 + a * 2 + b) {
    DP_ALL(3);
    DP_ALL(4);
    DP_ALL(5);
    DP_ALL(6);
  }
}

static inline void load_a(int a, const int8_t *src, int64_t kc) {
  if (a) _tile_loadd(7, src, kc); else _tile_loadd(0, src, kc);
}

static inline void load_b(int b, const void *src) {
  if (b) _tile_loadd(2, src, 64); else _tile_loadd(1, src, 64);
}

static inline void zero_sums(int count) {
  _tile_zero(3);
  if (count > 1) _tile_zero(4);
  if (count > 2) _tile_zero(5);
  if (count > 3) _tile_zero(6);
}

static inline void store_sums(int count, int32_t *dst /* [count][16 x 16] */) {
  _tile_stored(3, dst, 64);
  if (count > 1) _tile_stored(4, dst + 256, 64);
  if (count > 2) _tile_stored(5, dst + 512, 64);
  if (count > 3) _tile_stored(6, dst + 768, 64);
}

static const float PLANE_UNIT[3] = {1.0f, 1.0f / 128, 1.0f / 16384};

/* totals[sum i][row m of the tile] += block b's int32 sums, digit planes joined, times the block's
 * scales (`scale`: the item's first panel). A tile holds at most 8 rows of x (>= 2 planes each). */
static inline void fold(const act_t *a, const int32_t *sums, float *totals, int64_t t0, int tiles, int panels,
                        const float *scale, int64_t nblocks, int64_t b) {
  for (int t = 0; t < tiles; t++)
    for (int p = 0; p < panels; p++) {
      const int i = t * panels + p;
      const __m512 s = _mm512_loadu_ps(scale + (p * nblocks + b) * 16);
      const int64_t m0 = a->tile_m0[t0 + t], m1 = a->tile_m0[t0 + t + 1];
      const int32_t *tile_sums = sums + i * 256;
      float *tile_totals = totals + i * 8 * 16;
      if (a->first_row[m1 - 1] == 2 * (m1 - 1 - m0) && a->planes[m1 - 1] == 2) { /* all rows in two planes */
        const __m512 unit = _mm512_set1_ps(PLANE_UNIT[1]);
        for (int64_t r = 0; r < m1 - m0; r++) {
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(tile_sums + 32 * r));
          const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(tile_sums + 32 * r + 16)), unit, hi);
          _mm512_store_ps(tile_totals + 16 * r, _mm512_fmadd_ps(s, v, _mm512_load_ps(tile_totals + 16 * r)));
        }
        continue;
      }
      for (int64_t m = m0; m < m1; m++) {
        const int32_t *row = sums + (i * 16 + a->first_row[m]) * 16;
        __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(row));
        for (int d = 1; d < a->planes[m]; d++)
          v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(row + 16 * d)), _mm512_set1_ps(PLANE_UNIT[d]), v);
        float *dst = totals + (i * 8 + (m - m0)) * 16;
        _mm512_store_ps(dst, _mm512_fmadd_ps(s, v, _mm512_load_ps(dst)));
      }
    }
}

typedef struct {
  const uint8_t *w;
  int bits;
  int64_t N;
  const float *scale, *scale_zero;  /* [N / 16][K / block][16] */
  uint16_t *out;
} weight_t;

/* One work item: row tiles t0 .. t0 + tiles - 1 times panels nb0 .. nb0 + panels - 1 (16 columns
 * each), tiles * panels <= 4. Each block's int32 sums are scaled into fp32 totals right away (in
 * L1), then planes, row scales and zero points in one pass at the end. */
static void amx_item(const act_t *a, const weight_t *wt, int64_t t0, int tiles, int64_t nb0, int panels) {
  const int64_t K = a->K, kc = a->kc, rows = a->rows, nblocks = K / a->block, chunks = K / kc;
  const int64_t chunks_per_block = a->block / kc;
  const int64_t chunk_bytes = wt->bits == 4 ? kc * 8 : kc * 16, panel_bytes = chunks * chunk_bytes;
  const int sums = tiles * panels;
  _Alignas(64) uint8_t unpacked[4][2][1024]; /* 4-bit: chunk k + 1 is unpacked while k multiplies */
  _Alignas(64) int32_t block_sums[4 * 256];
  _Alignas(64) float totals[4 * 8 * 16];
  memset(totals, 0, sizeof totals);
  const uint8_t *wp = wt->w + nb0 * panel_bytes;
  const int four = wt->bits == 4;
  if (four)
    for (int p = 0; p < panels; p++) unpack4(wp + p * panel_bytes, kc, unpacked[p][0]);
  for (int64_t b = 0; b < nblocks; b++) {
    zero_sums(sums);
    for (int64_t c = 0; c < chunks_per_block; c++) {
      const int64_t k = b * chunks_per_block + c;
      for (int p = 0; p < panels; p++) {
        const uint8_t *chunk = wp + p * panel_bytes + k * chunk_bytes;
        prefetch_chunk(chunk, chunk_bytes);
        if (four && k + 1 < chunks) unpack4(chunk + chunk_bytes, kc, unpacked[p][(k + 1) & 1]);
      }
#define B_SRC(p) (four ? (const void *)unpacked[p][k & 1] : (const void *)(wp + (p) * panel_bytes + k * chunk_bytes))
      const int8_t *a_src = a->xq + t0 * rows * K + k * rows * kc;
      if (tiles == 1 && panels == 4) { /* the two common shapes, with constant tile numbers (no switch) */
        _tile_loadd(0, a_src, kc);
        _tile_loadd(1, B_SRC(0), 64);
        _tile_dpbsud(3, 0, 1);
        _tile_loadd(2, B_SRC(1), 64);
        _tile_dpbsud(4, 0, 2);
        _tile_loadd(1, B_SRC(2), 64);
        _tile_dpbsud(5, 0, 1);
        _tile_loadd(2, B_SRC(3), 64);
        _tile_dpbsud(6, 0, 2);
      } else if (tiles == 2 && panels == 2) {
        _tile_loadd(0, a_src, kc);
        _tile_loadd(7, a_src + rows * K, kc);
        _tile_loadd(1, B_SRC(0), 64);
        _tile_dpbsud(3, 0, 1);
        _tile_dpbsud(5, 7, 1);
        _tile_loadd(2, B_SRC(1), 64);
        _tile_dpbsud(4, 0, 2);
        _tile_dpbsud(6, 7, 2);
      } else if (tiles == 1) { /* one A tile, up to four panels */
        load_a(0, a_src, kc);
        for (int p = 0; p < panels; p++) {
          load_b(p & 1, B_SRC(p));
          multiply(p, 0, p & 1);
        }
      } else { /* one panel held in B, A tiles streamed */
        load_b(0, B_SRC(0));
        for (int t = 0; t < tiles; t++) {
          load_a(t & 1, a_src + t * rows * K, kc);
          multiply(t, t & 1, 0);
        }
      }
    }
    store_sums(sums, block_sums);
    fold(a, block_sums, totals, t0, tiles, panels, wt->scale + nb0 * nblocks * 16, nblocks, b);
  }
  for (int t = 0; t < tiles; t++)
    for (int p = 0; p < panels; p++) {
      const float *sz = wt->scale_zero + (nb0 + p) * nblocks * 16;
      const int i = t * panels + p;
      const int64_t m0 = a->tile_m0[t0 + t];
      for (int64_t m = m0; m < a->tile_m0[t0 + t + 1]; m++) {
        __m512 zero = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblocks; b++)
          zero = _mm512_fnmadd_ps(_mm512_loadu_ps(sz + b * 16), _mm512_set1_ps(a->xsum[m * nblocks + b]), zero);
        const __m512 q = _mm512_load_ps(totals + (i * 8 + (m - m0)) * 16);
        const __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(a->scale[m]), q, zero);
        _mm256_storeu_si256((__m256i *)(wt->out + m * wt->N + (nb0 + p) * 16), (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
}

/* Bytes of scratch qs_amx_linear needs (the caller allocates it, so that running out of memory is
 * a Python error, not a crash here). */
int64_t qs_amx_scratch_bytes(int64_t M, int64_t K, int64_t block) {
  const int64_t max_tiles = (3 * M + 13) / 14 + 1; /* every full tile holds >= 14 rows */
  return 64 + M * (K / block) * 4 + M * 16 + (max_tiles + 1) * 4 + 64 + max_tiles * 16 * K;
}

/* y = x @ W^T. x, y bf16 row-major. Needs K % kc == 0, block % kc == 0, K % block == 0 (kc: 64,
 * or 32 for blocks of 32), N % 16 == 0, bits 4 (codes 0..15) or 8 (0..255). */
void qs_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int bits, const float *scale,
                   const float *scale_zero, int64_t block, int64_t kc, void *scratch, uint16_t *out, int threads) {
  act_t a = {.M = M, .K = K, .block = block, .kc = kc};
  char *s = (char *)scratch;
  a.xsum = (float *)s; s += M * (K / block) * 4;
  a.scale = (float *)s; s += M * 4;
  a.first_row = (int32_t *)s; s += M * 4;
  a.planes = (int32_t *)s; s += M * 4;
  a.tile_of = (int32_t *)s; s += M * 4;
  a.tile_m0 = (int32_t *)s; s += ((3 * M + 13) / 14 + 2) * 4;
  a.xq = (int8_t *)(((uintptr_t)s + 63) & ~(uintptr_t)63);
  const weight_t wt = {.w = w, .bits = bits, .N = N, .scale = scale, .scale_zero = scale_zero, .out = out};
  const int64_t panels = N / 16;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) measure_row(x + m * K, &a, m);
#pragma omp single
    assign_tiles(&a); /* rows past a tile's last plane stay as they are: their sums are never read */
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) write_planes(x + m * K, &a, m);
    /* work item shape: A tiles x panels sharing the four sum tiles */
    const int tiles = a.tiles >= 4 ? 4 : a.tiles >= 2 ? 2 : 1, per_item = 4 / tiles;
    const int64_t panel_groups = (panels + per_item - 1) / per_item;
    configure_tiles(a.rows, (int)kc);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < panel_groups; g++)
      for (int64_t t0 = 0; t0 < a.tiles; t0 += tiles) {
        const int count = panels - g * per_item < per_item ? (int)(panels - g * per_item) : per_item;
        const int item_tiles = a.tiles - t0 < tiles ? (int)(a.tiles - t0) : tiles;
        if (item_tiles == 3) { /* 3 x 1 does not fit the 2 x 2 / 4 x 1 code: split into 2 + 1 */
          amx_item(&a, &wt, t0, 2, g * per_item, count);
          amx_item(&a, &wt, t0 + 2, 1, g * per_item, count);
        } else {
          amx_item(&a, &wt, t0, item_tiles, g * per_item, count);
        }
      }
    _tile_release();
  }
}
