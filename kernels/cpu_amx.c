/* Weight-only quantized GEMM on x86 AMX: y[M, N] = x[M, K] (bf16) @ W^T with 4- or 8-bit codes.
 *
 * Why it is fast: a code c (0..15) ORed into the low mantissa bits of bf16 128.0 (0x4300) is the
 * bf16 number 128 + c exactly, so unpacking is an OR, not a conversion. An 8-bit code 16h + l is
 * two such planes: (0x4500 | h) = 2048 + 16h and (0x4300 | l) = 128 + l, both fed to the same
 * accumulator. AMX sums C = x . (offset + q) per quantization block in fp32, and an epilogue
 * removes the offset and applies the group scale:
 *     y[m, n] += s[b, n] * C[m, n] - s[b, n] * (offset + z[b, n]) * sum_{k in b} x[m, k]
 * (the second factor, `scale_zero`, is precomputed at load). The unpacked weight never leaves L1,
 * and the cancelling offsets stay in fp32 (relative error ~2^-24 * offset / |q - z|, far below
 * the bf16 output's rounding).
 *
 * Tiles also win at M = 1 (one-row tiles): measured against AVX512-BF16 dot products fed from
 * registers, 62 vs 67 us hot and 103 vs 213 us from DRAM (4-bit, K = N = 2048, 2 cores). The
 * unpacking (vector stores) and the tile loads that read it back do not fully overlap: a tile
 * load waits for those stores, so chunks are unpacked one step ahead of their products.
 *
 * Packed weight, per panel of 16 output columns (nb) and chunk of 32 input rows (kc):
 *   4-bit: 256 bytes; byte 32*i + 2*col + p holds k = 32kc + 2i + p (low nibble) and
 *          k = 32kc + 16 + 2i + p (high nibble), n = 16nb + col: one 32-byte load unpacks to
 *          rows i and i + 8 of AMX's bf16 B tile (row r = the pair of k 2r, 2r + 1).
 *   8-bit: 512 bytes; byte 32*i + 2*col + p holds k = 32kc + 2i + p whole.
 * Scales: float32 [N/16][K/block][16] for s and for s * (offset + z).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PREFETCH_AHEAD 4
#ifndef AHEAD
#define AHEAD 1 /* chunks unpacked ahead of their products */
#endif
#define RING (AHEAD + 1)

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

/* Tiles: 0, 7 = x rows (A); 1, 2 = unpacked weight chunks (B); 3..6 = fp32 accumulators (C),
 * one per (row tile, panel) pair of the work item: 1 x 4 for up to 16 rows of x, 2 x 2 for 32,
 * 4 x 1 beyond, so that every A and B tile loaded serves several products. */
static void configure_tiles(int rows) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = t == 1 || t == 2 ? 16 : rows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

/* One chunk (32 k x 16 n) to bf16 B-tile rows: lo gets 16 rows; hi too for 8-bit codes. */
static inline void unpack_chunk(const uint8_t *src, int bits, uint16_t *lo, uint16_t *hi) {
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const __m512i base128 = _mm512_set1_epi16(0x4300);
  if (bits == 4) {
    for (int i = 0; i < 8; i++) {
      __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + 32 * i)));
      _mm512_store_si512((__m512i *)(lo + 32 * i), _mm512_ternarylogic_epi32(w, nibble, base128, 0xEA));
      _mm512_store_si512((__m512i *)(lo + 32 * (i + 8)), _mm512_or_si512(_mm512_srli_epi16(w, 4), base128));
    }
  } else {
    const __m512i base2048 = _mm512_set1_epi16(0x4500);
    for (int i = 0; i < 16; i++) {
      __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + 32 * i)));
      _mm512_store_si512((__m512i *)(lo + 32 * i), _mm512_ternarylogic_epi32(w, nibble, base128, 0xEA));
      _mm512_store_si512((__m512i *)(hi + 32 * i), _mm512_or_si512(_mm512_srli_epi16(w, 4), base2048));
    }
  }
}

/* Request the chunk PREFETCH_AHEAD chunks on (measured on weights streaming from DRAM: 3-10%
 * faster; further ahead or into L2 only was no better). */
static inline void prefetch_chunk(const uint8_t *chunk, int64_t chunk_bytes) {
  const char *p = (const char *)chunk + PREFETCH_AHEAD * chunk_bytes;
  for (int64_t off = 0; off < chunk_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

static inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* xsum[m, b] = sum of x[m, k] over block b, in fp32 (block % 16 == 0). */
static void block_sums(const uint16_t *x, int64_t M, int64_t K, int64_t block, float *xsum) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < K / block; b++) {
      __m512 s = _mm512_setzero_ps();
      const uint16_t *row = x + m * K + b * block;
      for (int64_t k = 0; k < block; k += 16) s = _mm512_add_ps(s, bf16_to_f32(_mm256_loadu_si256((const __m256i *)(row + k))));
      xsum[m * (K / block) + b] = _mm512_reduce_add_ps(s);
    }
}

/* x as A tiles of `rows` rows (16, or M when M < 16), [tile][kc][row][32], missing rows zero:
 * one contiguous KB per tile (x's own rows are K * 2 bytes apart, which for K a multiple of 2048
 * would put a tile's 16 rows in one L1 set). */
static void pack_rows(const uint16_t *x, int64_t M, int64_t K, int rows, uint16_t *dst) {
  for (int64_t m0 = 0; m0 < M; m0 += rows)
    for (int64_t kc = 0; kc < K / 32; kc++)
      for (int m = 0; m < rows; m++) {
        __m512i v = m0 + m < M ? _mm512_loadu_si512((const __m512i *)(x + (m0 + m) * K + kc * 32)) : _mm512_setzero_si512();
        _mm512_storeu_si512((__m512i *)(dst + m0 * K + (kc * rows + m) * 32), v);
      }
}

#define DP(C, A, B) \
  case ((C - 3) * 8 + (A == 7) * 4 + (B - 1)): _tile_dpbf16ps(C, A, B); break
#define DP_ALL(C) DP(C, 0, 1); DP(C, 0, 2); DP(C, 7, 1); DP(C, 7, 2)

/* acc tile c (0..3, tile 3 + c) += A tile a (0 or 1: tile 0 or 7) x B tile b (0 or 1: tile 1 or 2).
 * Tile numbers must be constants, hence the switch. */
static inline void multiply(int c, int a, int b) {
  switch (c * 8 + a * 4 + b) {
    DP_ALL(3);
    DP_ALL(4);
    DP_ALL(5);
    DP_ALL(6);
  }
}

static inline void load_a(int a, const uint16_t *src) {
  if (a) _tile_loadd(7, src, 64); else _tile_loadd(0, src, 64);
}

static inline void load_b(int b, const uint16_t *src) {
  if (b) _tile_loadd(2, src, 64); else _tile_loadd(1, src, 64);
}

static inline void zero_accumulators(int count) {
  _tile_zero(3);
  if (count > 1) _tile_zero(4);
  if (count > 2) _tile_zero(5);
  if (count > 3) _tile_zero(6);
}

static inline void store_accumulators(int count, float *dst /* [count][16 x 16] */) {
  _tile_stored(3, dst, 64);
  if (count > 1) _tile_stored(4, dst + 256, 64);
  if (count > 2) _tile_stored(5, dst + 512, 64);
  if (count > 3) _tile_stored(6, dst + 768, 64);
}

/* One work item: row tiles t0 .. t0 + tiles - 1 of x (each `rows` rows) times panels
 * nb0 .. nb0 + panels - 1 (16 columns each), tiles * panels <= 4. Products per quantization
 * block on AMX, then the blocks' scales and zero points in one vector pass. */
static void amx_item(const uint16_t *xtiles, int64_t M, int64_t K, int rows, int64_t t0, int tiles, const uint8_t *w,
                     int bits, const float *scale, const float *scale_zero, int64_t block, const float *xsum,
                     float *acc, uint16_t *out, int64_t N, int64_t nb0, int panels) {
  const int64_t nblocks = K / block, chunks_per_block = block / 32, chunks = K / 32;
  const int64_t chunk_bytes = bits == 4 ? 256 : 512, panel_bytes = chunks * chunk_bytes;
  const int accs = tiles * panels;
  /* Chunk kc is unpacked one step before its products, into a ring of buffers: a tile load waits
   * until the stores that wrote its data are done, and those wait behind every older instruction. */
  _Alignas(64) uint16_t lo[4][RING][512], hi[4][RING][512];
  const uint8_t *wp = w + nb0 * panel_bytes;
  for (int64_t kc = 0; kc < AHEAD && kc < chunks; kc++)
    for (int p = 0; p < panels; p++)
      unpack_chunk(wp + p * panel_bytes + kc * chunk_bytes, bits, lo[p][kc % RING], hi[p][kc % RING]);
  for (int64_t b = 0; b < nblocks; b++) {
    zero_accumulators(accs);
    for (int64_t c = 0; c < chunks_per_block; c++) {
      const int64_t kc = b * chunks_per_block + c;
      if (kc + AHEAD < chunks)
        for (int p = 0; p < panels; p++) {
          const uint8_t *next = wp + p * panel_bytes + (kc + AHEAD) * chunk_bytes;
          prefetch_chunk(next, chunk_bytes);
          unpack_chunk(next, bits, lo[p][(kc + AHEAD) % RING], hi[p][(kc + AHEAD) % RING]);
        }
      const uint16_t *a_src = xtiles + t0 * rows * K + kc * rows * 32;
      if (tiles == 1) { /* one x tile, up to four panels: A once, B per panel */
        load_a(0, a_src);
        for (int p = 0; p < panels; p++) {
          load_b(0, lo[p][kc % RING]);
          multiply(p, 0, 0);
          if (bits == 8) {
            load_b(1, hi[p][kc % RING]);
            multiply(p, 0, 1);
          }
        }
      } else if (tiles == 2) { /* two x tiles held, B per panel */
        load_a(0, a_src);
        load_a(1, a_src + rows * K);
        for (int p = 0; p < panels; p++) {
          load_b(0, lo[p][kc % RING]);
          if (bits == 8) load_b(1, hi[p][kc % RING]);
          for (int t = 0; t < 2; t++) {
            multiply(t * panels + p, t, 0);
            if (bits == 8) multiply(t * panels + p, t, 1);
          }
        }
      } else { /* one panel held in B, x tiles streamed through A 0 / A 7 */
        load_b(0, lo[0][kc % RING]);
        if (bits == 8) load_b(1, hi[0][kc % RING]);
        for (int t = 0; t < tiles; t++) {
          load_a(t & 1, a_src + t * rows * K);
          multiply(t, t & 1, 0);
          if (bits == 8) multiply(t, t & 1, 1);
        }
      }
    }
    store_accumulators(accs, acc + b * 4 * 256);
  }
  for (int t = 0; t < tiles; t++)
    for (int p = 0; p < panels; p++) {
      const float *s = scale + (nb0 + p) * nblocks * 16, *sz = scale_zero + (nb0 + p) * nblocks * 16;
      for (int r = 0; r < rows; r++) {
        const int64_t m = (t0 + t) * rows + r;
        if (m >= M) break;
        __m512 total = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblocks; b++) {
          const float *part = acc + (b * 4 + t * panels + p) * 256 + 16 * r;
          total = _mm512_fmadd_ps(_mm512_loadu_ps(s + b * 16), _mm512_load_ps(part), total);
          total = _mm512_fnmadd_ps(_mm512_loadu_ps(sz + b * 16), _mm512_set1_ps(xsum[m * nblocks + b]), total);
        }
        _mm256_storeu_si256((__m256i *)(out + m * N + (nb0 + p) * 16), (__m256i)_mm512_cvtneps_pbh(total));
      }
    }
}

/* y = x @ W^T. x, y bf16 row-major. Scratch from the caller (so that running out of memory is a
 * Python error, not a crash here): xsum M * (K / block) floats; xtiles row_tiles * rows * K bf16
 * (rows = min(M, 16), row_tiles = ceil(M / rows)); acc threads * (K / block) * 1024 floats.
 * Needs K % 32 == 0, block % 32 == 0, K % block == 0, N % 16 == 0, bits 4 or 8. */
void qs_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int bits,
                   const float *scale, const float *scale_zero, int64_t block, float *xsum, uint16_t *xtiles,
                   float *acc, uint16_t *out, int threads) {
  block_sums(x, M, K, block, xsum);
  const int rows = M < 16 ? (int)M : 16;
  const int64_t row_tiles = (M + rows - 1) / rows, panels = N / 16;
  /* work item shape: x tiles x panels sharing the four accumulators */
  const int tiles = row_tiles >= 4 ? 4 : row_tiles >= 2 ? 2 : 1, per_item = 4 / tiles;
  pack_rows(x, M, K, rows, xtiles);
  const int64_t panel_groups = (panels + per_item - 1) / per_item;
#pragma omp parallel num_threads(threads)
  {
    float *my_acc = acc + (int64_t)omp_get_thread_num() * (K / block) * 1024;
    configure_tiles(rows);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < panel_groups; g++)
      for (int64_t t0 = 0; t0 < row_tiles; t0 += tiles) {
        const int count = panels - g * per_item < per_item ? (int)(panels - g * per_item) : per_item;
        const int item_tiles = row_tiles - t0 < tiles ? (int)(row_tiles - t0) : tiles;
        const int64_t nb0 = g * per_item;
        if (item_tiles == 3) { /* 3 x 1 does not fit the 2 x 2 / 4 x 1 code: split into 2 + 1 */
          amx_item(xtiles, M, K, rows, t0, 2, w, bits, scale, scale_zero, block, xsum, my_acc, out, N, nb0, count);
          amx_item(xtiles, M, K, rows, t0 + 2, 1, w, bits, scale, scale_zero, block, xsum, my_acc, out, N, nb0, count);
        } else {
          amx_item(xtiles, M, K, rows, t0, item_tiles, w, bits, scale, scale_zero, block, xsum, my_acc, out, N, nb0,
                   count);
        }
      }
    _tile_release();
  }
}
