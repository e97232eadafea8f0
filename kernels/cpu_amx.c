/* Weight-only quantized GEMM on x86 AMX: y[M, N] = x[M, K] (bf16) @ W^T with 4- or 8-bit codes.
 *
 * Two ways through AMX, chosen by M (measured on a 2-core Xeon, K = N = 2048):
 *
 * Digits (M <= 10; 8-bit codes: M <= 20). AMX multiplies int8 by uint8 with exact int32 sums
 * (TDPBSUD), so 8-bit codes go from memory straight into tiles and 4-bit codes need one AND (and
 * a shift). The activations become three int8 digit planes per row,
 *     x[m, k] = s_m * (d0 + d1 / 128 + d2 / 16384),   s_m a power of two, |x| <= 127 s_m,
 * exact to 2^-21 of the row's largest magnitude (two planes were measured too coarse: real
 * activations have outlier channels, max|x| ~ 10-35 x mean|x|, and lost 0.6 % perplexity). The
 * planes are rows of the A tile, which has 16 rows: up to M = 5 they cost nothing.
 *
 * Bf16 (larger M). Each code is ORed into the low mantissa of bf16 128.0, giving 128 + q exactly
 * (8-bit codes: two planes, 2048 + 16 h and 128 + l), and x stays bf16 as it is: from there on
 * cheaper than digit planes, which triple the rows of x that every weight tile meets.
 *
 * Both sum per quantization block on AMX; the block's scale is applied in fp32 and the zero point
 * (and the bf16 path's offset) comes out through the block sums of x:
 *     y[m, n] = s_m * sum_b s[b, n] C_b[m, n] - sum_b s[b, n] (z[b, n] + offset) sum_{k in b} x[m, k]
 *
 * Packed weight, per panel of 16 output columns and chunk of kc input rows (kc = 64, or 32 for
 * 32-row blocks), in AMX's int8 B-tile layout (tile row i, column n, byte p holds k = 4i + p):
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
#define PREFETCH_AHEAD 4 /* chunks, into L1: measured best (2-16 ahead, into L1 or L2 only, tried) */
#define PLANES 3         /* digit planes per row of x */

/* Linux gives AMX's tile state to a process only on request; 1 on success. */
int qs_amx_init(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* The digit path's range of M: up to 2 A tiles for 4-bit codes, 4 for 8-bit ones, which skip the
 * unpacking (measured crossovers, K = N = 2048). */
static int uses_digits(int64_t M, int bits) { return M <= (bits == 8 ? 20 : 10); }

typedef struct {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Tiles: 0, 7 = x (A: rows x 64 bytes, kc int8 digits or 32 bf16); 1, 2 = weight (B: 16 rows of
 * 64 bytes, kc / 4 for digits); 3..6 = sums (C), one per (row tile, panel) pair of a work item. */
static void configure_tiles(int rows, int a_bytes, int b_rows) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) {
    const int is_b = t == 1 || t == 2, is_a = t == 0 || t == 7;
    cfg.rows[t] = is_b ? b_rows : rows;
    cfg.colsb[t] = is_a ? a_bytes : 64;
  }
  _tile_loadconfig(&cfg);
}

/* ---- activations ---- */

typedef struct {
  int64_t M, K, block, kc;
  int digits;       /* 1: int8 digit planes, 0: bf16 */
  int planes;       /* A-tile rows per row of x: PLANES or 1 */
  int per_tile;     /* rows of x per A tile */
  int rows;         /* A-tile rows configured */
  int64_t tiles;    /* A tiles */
  float *xsum;      /* [M][K / block] */
  float *scale;     /* [M] s_m (1 for bf16) */
  void *xa;         /* A tiles: digits [tile][K / kc][rows][kc] int8; bf16 [tile][K / 32][rows][32] */
} act_t;

static inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __m512 load_x(const uint16_t *p) { return bf16_to_f32(_mm256_loadu_si256((const __m256i *)p)); }

/* Block sums of row m, and for digits its scale: the power of two with 63.5 s < max|x| <= 127 s
 * (not below 2^-120, so that 1 / s stays finite). */
static void measure_row(const uint16_t *row, const act_t *a, int64_t m) {
  __m512 mx = _mm512_setzero_ps();
  const int64_t nblocks = a->K / a->block;
  for (int64_t b = 0; b < nblocks; b++) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = b * a->block; k < (b + 1) * a->block; k += 16) {
      const __m512 v = load_x(row + k);
      s = _mm512_add_ps(s, v);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    a->xsum[m * nblocks + b] = _mm512_reduce_add_ps(s);
  }
  float s = 1.0f; /* bf16 rows keep 1 */
  const float amax = _mm512_reduce_max_ps(mx);
  if (a->digits && !(amax <= FLT_MAX)) {
    s = NAN; /* inf or NaN in the row: its outputs are NaN, as a dense matmul's would be */
  } else if (a->digits && amax > 0) {
    while (amax > 127.0f * s) s *= 2.0f;
    while (amax <= 63.5f * s && s > 0x1p-120f) s *= 0.5f;
  }
  a->scale[m] = s;
}

/* Row m into the A tiles: digits d = round-half-up(v), v <- (v - d) * 128 (in [-64, 64), exact
 * in fp32), or its bf16 values as they are. */
static void write_row(const uint16_t *row, const act_t *a, int64_t m) {
  const int64_t t = m / a->per_tile, r = (m % a->per_tile) * a->planes;
  if (!a->digits) {
    uint16_t *dst = (uint16_t *)a->xa + t * a->rows * a->K + r * 32;
    for (int64_t k0 = 0; k0 < a->K; k0 += 32, dst += a->rows * 32)
      _mm512_storeu_si512((__m512i *)dst, _mm512_loadu_si512((const __m512i *)(row + k0)));
    return;
  }
  const __m512 inv = _mm512_set1_ps(1.0f / a->scale[m]), f128 = _mm512_set1_ps(128.0f), half = _mm512_set1_ps(0.5f);
  const int64_t kc = a->kc;
  int8_t *dst = (int8_t *)a->xa + t * a->rows * a->K + r * kc;
  for (int64_t k0 = 0; k0 < a->K; k0 += kc, dst += a->rows * kc)
    for (int64_t k = 0; k < kc; k += 16) {
      __m512 v = _mm512_mul_ps(load_x(row + k0 + k), inv);
      for (int p = 0; p < PLANES; p++) {
        const __m512 d = _mm512_roundscale_ps(_mm512_add_ps(v, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + p * kc + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(d)));
        v = _mm512_mul_ps(_mm512_sub_ps(v, d), f128);
      }
    }
}

/* ---- weights into B tiles ---- */

typedef struct {
  const uint8_t *w;
  int bits;
  int64_t N;
  const float *scale, *scale_zero; /* [N / 16][K / block][16] */
  float offset;                    /* the bf16 path's code offset: 128 (4-bit) or 2176 (8-bit) */
  uint16_t *out;
} weight_t;

/* 4-bit chunk -> the int8 B tile (kc * 16 bytes). */
static inline void unpack_digits(const uint8_t *src, int64_t kc, uint8_t *dst) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t half = kc * 8;
  for (int64_t i = 0; i < half; i += 64) {
    const __m512i v = _mm512_loadu_si512((const void *)(src + i));
    _mm512_store_si512((void *)(dst + i), _mm512_and_si512(v, low));
    _mm512_store_si512((void *)(dst + half + i), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

/* One int8 B-tile row (16 columns x 4 k, codes < 16) -> bf16 B-tile rows 2i, 2i + 1 (16 columns x
 * 2 k each), every code ORed into `base` (0x4300: 128 + q; 0x4500: 2048 + 16 q). */
static inline void to_bf16_rows(__m512i codes, __m512i base, uint16_t *dst) {
  /* per 128-bit lane, 4 columns: bytes (c, p) -> words (c, p) for p = 0, 1 and for p = 2, 3 */
  const __m512i first = _mm512_set4_epi32(0x800d800c, 0x80098008, 0x80058004, 0x80018000);
  const __m512i second = _mm512_set4_epi32(0x800f800e, 0x800b800a, 0x80078006, 0x80038002);
  _mm512_store_si512((__m512i *)dst, _mm512_or_si512(_mm512_shuffle_epi8(codes, first), base));
  _mm512_store_si512((__m512i *)(dst + 32), _mm512_or_si512(_mm512_shuffle_epi8(codes, second), base));
}

/* A chunk -> bf16 B tiles, 512 values each: 4-bit, kc / 32 tiles of 128 + q; 8-bit, kc / 32 pairs
 * (2048 + 16 h tile, 128 + l tile), pair j at dst + 1024 j. */
static inline void unpack_bf16(const uint8_t *src, int64_t kc, int bits, uint16_t *dst) {
  const __m512i low = _mm512_set1_epi8(0x0F), base128 = _mm512_set1_epi16(0x4300);
  if (bits == 4) { /* int8 row i is packed line i % (kc / 8): low nibbles for i < kc / 8 */
    const int64_t lines = kc / 8;
    for (int64_t i = 0; i < lines; i++) {
      const __m512i v = _mm512_loadu_si512((const void *)(src + 64 * i));
      to_bf16_rows(_mm512_and_si512(v, low), base128, dst + 64 * i);
      to_bf16_rows(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), base128, dst + 64 * (lines + i));
    }
  } else {
    const __m512i base2048 = _mm512_set1_epi16(0x4500);
    for (int64_t i = 0; i < kc / 4; i++) { /* int8 row i holds k 4i..4i+3: bf16 tile i / 8, rows 2(i % 8) + 0, 1 */
      const __m512i v = _mm512_loadu_si512((const void *)(src + 64 * i));
      uint16_t *pair = dst + 1024 * (i / 8) + 64 * (i % 8);
      to_bf16_rows(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), base2048, pair);
      to_bf16_rows(_mm512_and_si512(v, low), base128, pair + 512);
    }
  }
}

/* Request the chunk PREFETCH_AHEAD chunks on into L1; an item with one panel streams only one run
 * of weight, and L1's few fill buffers then limit how much is in flight: it also asks L2 for the
 * chunk 16 on (measured from DRAM, 8-bit at M = 16: 330 -> 250 us; with more panels, slower). */
static inline void prefetch_chunk(const uint8_t *chunk, int64_t chunk_bytes, int one_stream) {
  const char *p = (const char *)chunk + PREFETCH_AHEAD * chunk_bytes;
  for (int64_t off = 0; off < chunk_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  if (one_stream) {
    const char *q = (const char *)chunk + 16 * chunk_bytes;
    for (int64_t off = 0; off < chunk_bytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T1);
  }
}

/* ---- tile products ---- */

/* Tile numbers must be constants, hence the switch. c: 0..3 (tile 3 + c); a: tile 0 or 7; b: tile 1 or 2. */
#define DP(OP, C, A, B) \
  case ((C - 3) * 4 + (A == 7) * 2 + (B - 1)): OP(C, A, B); break
#define DP_ALL(OP, C) DP(OP, C, 0, 1); DP(OP, C, 0, 2); DP(OP, C, 7, 1); DP(OP, C, 7, 2)

static inline void multiply(int digits, int c, int a, int b) {
  if (digits)
    switch (c * 4 + a * 2 + b) { DP_ALL(_tile_dpbsud, 3); DP_ALL(_tile_dpbsud, 4); DP_ALL(_tile_dpbsud, 5); DP_ALL(_tile_dpbsud, 6); }
  else
    switch (c * 4 + a * 2 + b) { DP_ALL(_tile_dpbf16ps, 3); DP_ALL(_tile_dpbf16ps, 4); DP_ALL(_tile_dpbf16ps, 5); DP_ALL(_tile_dpbf16ps, 6); }
}

static inline void load_a(int a, const void *src, int64_t stride) {
  if (a) _tile_loadd(7, src, stride); else _tile_loadd(0, src, stride);
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

static inline void store_sums(int count, void *dst /* [count][16 x 16] int32 or float */) {
  _tile_stored(3, dst, 64);
  if (count > 1) _tile_stored(4, (char *)dst + 1024, 64);
  if (count > 2) _tile_stored(5, (char *)dst + 2048, 64);
  if (count > 3) _tile_stored(6, (char *)dst + 3072, 64);
}

/* One K step of a work item: x tiles (A, `a_src` the first, `a_next` bytes apart) times the
 * panels' B tiles (plane 0: b0[p]; with two planes also b1[p], into the same sums), into sums
 * tile * panels + p. */
static inline void products(int digits, int tiles, int panels, const char *a_src, int64_t a_next, int64_t a_row,
                            const void *const b0[4], const void *const b1[4], int planes) {
  if (tiles == 1) { /* one A tile, up to four panels */
    load_a(0, a_src, a_row);
    for (int p = 0; p < panels; p++) {
      const int b = planes == 2 ? 0 : p & 1;
      load_b(b, b0[p]);
      multiply(digits, p, 0, b);
      if (planes == 2) {
        load_b(1, b1[p]);
        multiply(digits, p, 0, 1);
      }
    }
  } else if (panels == 2) { /* two A tiles, two panels */
    load_a(0, a_src, a_row);
    load_a(1, a_src + a_next, a_row);
    for (int p = 0; p < 2; p++) {
      const int b = planes == 2 ? 0 : p;
      load_b(b, b0[p]);
      if (planes == 2) load_b(1, b1[p]);
      multiply(digits, p, 0, b);
      multiply(digits, 2 + p, 1, b);
      if (planes == 2) {
        multiply(digits, p, 0, 1);
        multiply(digits, 2 + p, 1, 1);
      }
    }
  } else { /* one panel held in B, A tiles streamed */
    load_b(0, b0[0]);
    if (planes == 2) load_b(1, b1[0]);
    for (int t = 0; t < tiles; t++) {
      load_a(t & 1, a_src + t * a_next, a_row);
      multiply(digits, t, t & 1, 0);
      if (planes == 2) multiply(digits, t, t & 1, 1);
    }
  }
}

static const float PLANE_UNIT[PLANES] = {1.0f, 1.0f / 128, 1.0f / 16384};

/* totals[sum i][row m of the tile] += block b's sums (digit planes joined) times the block's
 * scales (`scale`: the item's first panel). */
static inline void fold(const act_t *a, const void *sums, float *totals, int64_t t0, int tiles, int panels,
                        const float *scale, int64_t nblocks, int64_t b) {
  for (int t = 0; t < tiles; t++) {
    const int64_t count = (a->M - (t0 + t) * a->per_tile) < a->per_tile ? a->M - (t0 + t) * a->per_tile : a->per_tile;
    for (int p = 0; p < panels; p++) {
      const int i = t * panels + p;
      const __m512 s = _mm512_loadu_ps(scale + (p * nblocks + b) * 16);
      float *tot = totals + i * 256;
      if (a->digits) {
        const int32_t *c = (const int32_t *)sums + i * 256;
        for (int64_t r = 0; r < count; r++) {
          __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 48 * r));
          v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + 48 * r + 16)), _mm512_set1_ps(PLANE_UNIT[1]), v);
          v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + 48 * r + 32)), _mm512_set1_ps(PLANE_UNIT[2]), v);
          _mm512_store_ps(tot + 16 * r, _mm512_fmadd_ps(s, v, _mm512_load_ps(tot + 16 * r)));
        }
      } else {
        const float *c = (const float *)sums + i * 256;
        for (int64_t r = 0; r < count; r++)
          _mm512_store_ps(tot + 16 * r, _mm512_fmadd_ps(s, _mm512_load_ps(c + 16 * r), _mm512_load_ps(tot + 16 * r)));
      }
    }
  }
}

/* One work item: A tiles t0 .. t0 + tiles - 1 times panels nb0 .. nb0 + panels - 1 (16 columns
 * each), tiles * panels <= 4. Each block's sums are scaled into fp32 totals right away (in L1),
 * then row scales and zero points in one pass at the end. */
static void amx_item(const act_t *a, const weight_t *wt, int64_t t0, int tiles, int64_t nb0, int panels) {
  const int64_t K = a->K, kc = a->kc, nblocks = K / a->block, chunks = K / kc;
  const int64_t chunks_per_block = a->block / kc;
  const int64_t chunk_bytes = wt->bits == 4 ? kc * 8 : kc * 16, panel_bytes = chunks * chunk_bytes;
  const int digits = a->digits, sums = tiles * panels, four = wt->bits == 4;
  /* unpacked chunks, two per panel: chunk k + 1 is unpacked while k multiplies */
  _Alignas(64) uint16_t unpacked[4][2][2048];
  _Alignas(64) float block_sums[4 * 256];
  _Alignas(64) float totals[4 * 256];
  memset(totals, 0, sizeof totals);
  const uint8_t *wp = wt->w + nb0 * panel_bytes;
  const int unpack = !digits || four;
#define UNPACK(src, dst) (digits ? unpack_digits(src, kc, (uint8_t *)(dst)) : unpack_bf16(src, kc, wt->bits, dst))
  if (unpack)
    for (int p = 0; p < panels; p++) UNPACK(wp + p * panel_bytes, unpacked[p][0]);
  /* A: digits, one tile per chunk; bf16, one per 32 k (kc / 32 per chunk, each with 1 or 2 B planes) */
  const int64_t a_row = digits ? kc : 64, a_next = a->rows * K * (digits ? 1 : 2);
  for (int64_t b = 0; b < nblocks; b++) {
    zero_sums(sums);
    for (int64_t c = 0; c < chunks_per_block; c++) {
      const int64_t k = b * chunks_per_block + c;
      for (int p = 0; p < panels; p++) {
        const uint8_t *chunk = wp + p * panel_bytes + k * chunk_bytes;
        prefetch_chunk(chunk, chunk_bytes, panels == 1);
        if (unpack && k + 1 < chunks) UNPACK(chunk + chunk_bytes, unpacked[p][(k + 1) & 1]);
      }
      const void *b0[4], *b1[4];
      if (digits) {
        for (int p = 0; p < panels; p++)
          b0[p] = four ? (const void *)unpacked[p][k & 1] : (const void *)(wp + p * panel_bytes + k * chunk_bytes);
        products(1, tiles, panels, (const char *)a->xa + t0 * a_next + k * a->rows * kc, a_next, a_row, b0, b1, 1);
        continue;
      }
      for (int64_t j = 0; j < kc / 32; j++) { /* bf16: 32 k per A tile; 8-bit codes in two B planes */
        for (int p = 0; p < panels; p++) {
          b0[p] = unpacked[p][k & 1] + (four ? 512 * j : 1024 * j);
          b1[p] = unpacked[p][k & 1] + 1024 * j + 512;
        }
        const char *a_src = (const char *)a->xa + t0 * a_next + (k * (kc / 32) + j) * a->rows * 64;
        products(0, tiles, panels, a_src, a_next, a_row, b0, b1, four ? 1 : 2);
      }
    }
    store_sums(sums, block_sums);
    fold(a, block_sums, totals, t0, tiles, panels, wt->scale + nb0 * nblocks * 16, nblocks, b);
  }
  const float offset = digits ? 0.0f : wt->offset;
  for (int t = 0; t < tiles; t++)
    for (int p = 0; p < panels; p++) {
      const float *s = wt->scale + (nb0 + p) * nblocks * 16, *sz = wt->scale_zero + (nb0 + p) * nblocks * 16;
      const int i = t * panels + p;
      for (int64_t r = 0; r < a->per_tile; r++) {
        const int64_t m = (t0 + t) * a->per_tile + r;
        if (m >= a->M) break;
        __m512 zero = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblocks; b++) {
          const __m512 s_zero = _mm512_fmadd_ps(_mm512_set1_ps(offset), _mm512_loadu_ps(s + b * 16), _mm512_loadu_ps(sz + b * 16));
          zero = _mm512_fnmadd_ps(s_zero, _mm512_set1_ps(a->xsum[m * nblocks + b]), zero);
        }
        const __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(a->scale[m]), _mm512_load_ps(totals + i * 256 + 16 * r), zero);
        _mm256_storeu_si256((__m256i *)(wt->out + m * wt->N + (nb0 + p) * 16), (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
}

/* ---- entry points ---- */

static act_t plan(int64_t M, int64_t K, int64_t block, int64_t kc, int bits) {
  act_t a = {.M = M, .K = K, .block = block, .kc = kc, .digits = uses_digits(M, bits)};
  a.planes = a.digits ? PLANES : 1;
  a.per_tile = a.digits ? 16 / PLANES : 16;
  if (a.per_tile > M) a.per_tile = (int)M;
  a.rows = a.per_tile * a.planes;
  a.tiles = (M + a.per_tile - 1) / a.per_tile;
  return a;
}

/* Bytes of scratch qs_amx_linear needs (the caller allocates it, so that running out of memory is
 * a Python error, not a crash here). */
int64_t qs_amx_scratch_bytes(int64_t M, int64_t K, int64_t block, int64_t kc, int bits) {
  const act_t a = plan(M, K, block, kc, bits);
  return M * (K / block) * 4 + M * 4 + 64 + a.tiles * a.rows * K * (a.digits ? 1 : 2);
}

/* y = x @ W^T. x, y bf16 row-major. Needs K % kc == 0, block % kc == 0, K % block == 0 (kc: 64,
 * or 32 for blocks of 32), N % 16 == 0, bits 4 (codes 0..15) or 8 (0..255). */
void qs_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int bits, const float *scale,
                   const float *scale_zero, int64_t block, int64_t kc, void *scratch, uint16_t *out, int threads) {
  act_t a = plan(M, K, block, kc, bits);
  char *s = (char *)scratch;
  a.xsum = (float *)s;
  s += M * (K / block) * 4;
  a.scale = (float *)s;
  s += M * 4;
  a.xa = (void *)(((uintptr_t)s + 63) & ~(uintptr_t)63);
  const weight_t wt = {.w = w, .bits = bits, .N = N, .scale = scale, .scale_zero = scale_zero,
                       .offset = bits == 4 ? 128.0f : 2176.0f, .out = out};
  const int64_t panels = N / 16;
  /* work item shape: A tiles x panels sharing the four sum tiles */
  const int tiles = a.tiles >= 4 ? 4 : (int)a.tiles, per_item = 4 / tiles; /* 1 x 4, 2 x 2, 3 x 1, 4 x 1 */
  const int64_t panel_groups = (panels + per_item - 1) / per_item;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
      measure_row(x + m * K, &a, m);
      write_row(x + m * K, &a, m); /* A-tile rows past the last row of x stay as they are: their sums are never read */
    }
    configure_tiles(a.rows, a.digits ? (int)kc : 64, a.digits ? (int)kc / 4 : 16);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < panel_groups; g++)
      for (int64_t t0 = 0; t0 < a.tiles; t0 += tiles) {
        const int count = panels - g * per_item < per_item ? (int)(panels - g * per_item) : per_item;
        const int item_tiles = a.tiles - t0 < tiles ? (int)(a.tiles - t0) : tiles;
        amx_item(&a, &wt, t0, item_tiles, g * per_item, count);
      }
    _tile_release();
  }
}
