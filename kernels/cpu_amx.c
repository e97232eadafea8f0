/* Weight-only quantized GEMM on x86 AMX: y[M, N] = x[M, K] (bf16) @ W^T with 4- or 8-bit codes.
 *
 * Two ways through AMX, chosen by M (measured on a 2-core Xeon, K = N = 2048):
 *
 * Digits (M <= 16). AMX multiplies int8 by uint8 with exact int32 sums (TDPBSUD), so 8-bit codes
 * go from memory straight into tiles and 4-bit codes need an AND and a shift. Each row of x
 * becomes two int8 digit planes,
 *     x[m, k] = s_m * (d0 + d1 / 256),   s_m = max_k |x[m, k]| / 127,
 * within 2^-16 of the row's largest magnitude (perplexity of the default model: 29.309 against
 * 29.294 with x exact in bf16, and 29.308 with torch's int4 op). Up to M = 8 a row's two planes
 * are adjacent rows of one A tile (amx/k_walk.h); from M = 9 A tile 0 holds plane 0 of every row
 * and tile 7 plane 1 (amx/plane_major.h).
 *
 * Bf16 (M > 16). Each code is ORed into the low mantissa of bf16 128.0, giving 128 + q exactly
 * (8-bit codes: two planes, 2048 + 16 h and 128 + l), and x stays bf16 as it is: at larger M
 * cheaper than digit planes, which double the rows of x that every weight tile meets.
 *
 * Both sum per quantization block on AMX; the block's scale is applied in fp32, and the zero point
 * (with the bf16 path's offset) comes out through the block sums of x, all in units of s_m:
 *     y[m, n] = s_m * sum_b (s[b, n] C_b[m, n] - s[b, n] (z[b, n] + offset) sum_{k in b} x[m, k] / s_m)
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
#define PREFETCH_AHEAD 4  /* chunks, into L1: measured best (2-16 ahead, into L1 or L2 only, tried) */
#define PLANES 2          /* digit planes per row of x */
#define PLANE_BASE 256.0f /* each plane's digits are 1/256 of the previous plane's */

/* Linux gives AMX's tile state to a process only on request; 1 on success. */
int qs_amx_init(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* The digit path's range of M: as long as a tile per plane holds every row (at M = 16 it takes
 * 92-100 us against 137 for bf16 tiles, 4- and 8-bit, K = N = 2048). */
static int uses_digits(int64_t M) { return M <= 16; }

typedef struct {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Tiles: 0, 7 = x (A: rows x 64 bytes, kc int8 digits or 32 bf16); 1, 2 = weight (B: 16 rows of
 * 64 bytes, kc / 4 for digits); 3..6 = sums (C), one per (A tile, panel) pair of a work item. */
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

/* ---- activations and weights ---- */

typedef struct {
  int64_t M, K, block, kc;
  int digits;       /* 1: int8 digit planes, 0: bf16 */
  int plane_major;  /* digits: A tile p holds plane p of every row (else a row's planes are adjacent rows) */
  int planes;       /* A-tile rows per row of x: PLANES or 1 */
  int per_tile;     /* rows of x per A tile */
  int rows;         /* A-tile rows configured */
  int64_t tiles;    /* A tiles */
  float *xsum;      /* [M][K / block]: block sums of x (digits: of its digits, in units of s_m) */
  float *scale;     /* [M] s_m (1 for bf16) */
  void *xa;         /* A tiles: digits [tile][K / kc][rows][kc] int8 (plane-major: [K / kc][plane][rows][kc]);
                       bf16 [tile][K / 32][rows][32] */
} act_t;

typedef struct {
  const uint8_t *w;
  int bits;
  int64_t N;
  const float *scale, *scale_zero; /* [N / 16][K / block][16] */
  float offset;                    /* the bf16 path's code offset: 128 (4-bit) or 2176 (8-bit) */
  uint16_t *out;
} weight_t;

#include "amx/activations.h"
#include "amx/weights.h"
#include "amx/sums.h"
#include "amx/k_walk.h"
#include "amx/plane_major.h"

/* ---- entry points ---- */

static act_t plan(int64_t M, int64_t K, int64_t block, int64_t kc) {
  act_t a = {.M = M, .K = K, .block = block, .kc = kc, .digits = uses_digits(M)};
  a.plane_major = a.digits && M > 16 / PLANES;
  a.planes = a.digits ? PLANES : 1;
  a.per_tile = a.plane_major ? (int)M : a.digits ? 16 / PLANES : 16;
  if (a.per_tile > M) a.per_tile = (int)M;
  a.rows = a.plane_major ? a.per_tile : a.per_tile * a.planes;
  a.tiles = a.plane_major ? PLANES : (M + a.per_tile - 1) / a.per_tile;
  return a;
}

/* Bytes of one copy of the activations: block sums, row scales, A tiles (64-byte aligned). */
static int64_t act_bytes(const act_t *a) {
  return (a->M * (a->K / a->block) * 4 + a->M * 4 + 63) / 64 * 64 + a->tiles * a->rows * a->K * (a->digits ? 1 : 2);
}

/* The digit path's few rows are prepared by every thread for itself: a copy shared between the
 * cores costs cross-core transfers and a barrier (M = 16: 7-10 us against 5 to make them all). */
static int copies(const act_t *a, int threads) { return a->digits ? threads : 1; }

/* Bytes of scratch qs_amx_linear needs (the caller allocates it, so that running out of memory is
 * a Python error, not a crash here). */
int64_t qs_amx_scratch_bytes(int64_t M, int64_t K, int64_t block, int64_t kc, int threads) {
  const act_t a = plan(M, K, block, kc);
  return 64 + copies(&a, threads) * act_bytes(&a);
}

/* Point a's arrays at copy i of the scratch. */
static void place(act_t *a, void *scratch, int i) {
  char *s = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63) + i * act_bytes(a);
  a->xsum = (float *)s;
  a->scale = (float *)(s + a->M * (a->K / a->block) * 4);
  a->xa = s + (a->M * (a->K / a->block) * 4 + a->M * 4 + 63) / 64 * 64;
}

/* y = x @ W^T. x, y bf16 row-major. Needs K % kc == 0, block % kc == 0, K % block == 0 (kc: 64,
 * or 32 for blocks of 32), N % 16 == 0, bits 4 (codes 0..15) or 8 (0..255); scratch of
 * qs_amx_scratch_bytes(M, K, block, kc, threads) bytes. */
void qs_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int bits, const float *scale,
                   const float *scale_zero, int64_t block, int64_t kc, void *scratch, uint16_t *out, int threads) {
  act_t shared = plan(M, K, block, kc);
  place(&shared, scratch, 0);
  const weight_t wt = {.w = w, .bits = bits, .N = N, .scale = scale, .scale_zero = scale_zero,
                       .offset = bits == 4 ? 128.0f : 2176.0f, .out = out};
  const int64_t panels = N / 16;
  /* work item shape: A tiles x panels sharing the four sum tiles */
  const int tiles = shared.tiles >= 4 ? 4 : (int)shared.tiles, per_item = 4 / tiles; /* 1 x 4, 2 x 2, 3 x 1, 4 x 1 */
  const int64_t panel_groups = (panels + per_item - 1) / per_item;
  const int own_copy = copies(&shared, threads) > 1;
#pragma omp parallel num_threads(threads)
  {
    act_t a = shared; /* this thread's: its own copy of the rows on the digit path */
    if (own_copy) { /* every row into this thread's copy: no barrier */
      place(&a, scratch, omp_get_thread_num());
      for (int64_t m = 0; m < M; m++) {
        measure_row(x + m * K, &a, m);
        write_row(x + m * K, &a, m);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; m++) {
        measure_row(x + m * K, &a, m);
        write_row(x + m * K, &a, m); /* A-tile rows past the last row of x stay as they are: their sums are never read */
      }
    }
    configure_tiles(a.rows, a.digits ? (int)kc : 64, a.digits ? (int)kc / 4 : 16);
    if (a.plane_major) { /* an even share of the panels per thread, in items of up to MAX_ITEM_PANELS */
      const int64_t team = omp_get_num_threads(), share = ((panels + team - 1) / team + 1) / 2 * 2;
      const int64_t lo = omp_get_thread_num() * share < panels ? omp_get_thread_num() * share : panels;
      const int64_t hi = lo + share < panels ? lo + share : panels;
      for (int64_t nb0 = lo; nb0 < hi; nb0 += MAX_ITEM_PANELS)
        planes_item(&a, &wt, nb0, hi - nb0 < MAX_ITEM_PANELS ? (int)(hi - nb0) : MAX_ITEM_PANELS);
    } else
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
