/* Work items for plane-major digit tiles (9 <= M <= 16).
 * Part of cpu_amx.c, which includes it after its types and constants. */

#define MAX_ITEM_PANELS 8
#define SPAN_BYTES 256

/* Plane-major digits (more rows of x than one A tile holds with their planes, up to 16): A tile
 * 0 holds digit plane 0 of every row, tile 7 plane 1. An item walks its panels two at a time
 * (tiles 1, 2), span by span, so that the span's x tiles stay in L1 while the weight streams past
 * (walking K panel by panel instead, x came from L2 for every weight tile: M = 16 took 1.4-1.8x
 * as long). The steps are pipelined: while AMX multiplies step i, the vector units unpack step
 * i + 1's 4-bit codes and fold step i - 1's sums (tiles 3, 4 and 5, 6) into the fp32 totals.
 * Spans within one fold (long blocks) carry their int32 sums in memory instead of folding. */
static void planes_item(const act_t *a, const weight_t *wt, int64_t nb0, int panels) {
  const int64_t K = a->K, kc = a->kc, nblocks = K / a->block, chunks = K / kc;
  const int64_t chunk_bytes = wt->bits == 4 ? kc * 8 : kc * 16, panel_bytes = chunks * chunk_bytes;
  /* chunks per span, the K range multiplied at a time: the block, or for long blocks its largest
   * divisor of at most SPAN_BYTES of x per plane row (x must stay in L1) that also divides CARRY_K */
  int64_t cps = a->block / kc;
  for (int64_t d = cps; d >= 1; d--)
    if (cps % d == 0 && d * kc <= SPAN_BYTES && (a->block <= CARRY_K || CARRY_K / kc % d == 0)) {
      cps = d;
      break;
    }
  const int64_t a_plane = a->rows * kc, a_chunk = 2 * a_plane, rows = a->rows, span_bytes = cps * chunk_bytes;
  const int64_t pairs = (panels + 1) / 2, steps = chunks / cps * pairs;
  const int four = wt->bits == 4;
  _Alignas(64) uint8_t unpacked[2][2][SPAN_BYTES * 16]; /* [step parity][panel of the pair]: the span's B tiles */
  _Alignas(64) int32_t sums[2][4][256];                      /* [step parity][tile 3..6] */
  _Alignas(64) int32_t carry[MAX_ITEM_PANELS / 2][4][256];    /* a pair's sums between spans of one fold */
  _Alignas(64) float totals[MAX_ITEM_PANELS][256];
  memset(totals, 0, sizeof totals);
#define STEP_WEIGHT(i) (wt->w + (nb0 + (i) % pairs * 2) * panel_bytes + (i) / pairs * span_bytes)
#define UNPACK_STEP(i)                                                                                    \
  for (int q = 0; q < 2 && (i) % pairs * 2 + q < panels; q++)                                           \
    for (int64_t c = 0; c < cps; c++) unpack_digits(STEP_WEIGHT(i) + q * panel_bytes + c * chunk_bytes, kc, unpacked[(i) & 1][q] + c * kc * 16);
  if (four) UNPACK_STEP(0);
  for (int64_t i = 0; i <= steps; i++) {
    if (i < steps) { /* multiply step i */
      const int64_t j = i / pairs, p = i % pairs * 2;
      const int pair = p + 1 < panels;
      const uint8_t *w0 = STEP_WEIGHT(i), *w1 = w0 + panel_bytes;
      if (fold_starts(a, j * cps * kc)) {
        _tile_zero(3);
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
      } else {
        _tile_loadd(3, carry[p / 2][0], 64);
        _tile_loadd(4, carry[p / 2][1], 64);
        _tile_loadd(5, carry[p / 2][2], 64);
        _tile_loadd(6, carry[p / 2][3], 64);
      }
      const char *xa = (const char *)a->xa + j * cps * a_chunk;
      for (int64_t c = 0; c < cps; c++) {
        const void *b0 = four ? (const void *)(unpacked[i & 1][0] + c * kc * 16) : w0 + c * chunk_bytes;
        const void *b1 = four ? (const void *)(unpacked[i & 1][1] + c * kc * 16) : w1 + c * chunk_bytes;
        const char *x = xa + c * a_chunk;
        _tile_loadd(0, x, kc);
        _tile_loadd(7, x + a_plane, kc);
        _tile_loadd(1, b0, 64);
        _tile_dpbsud(3, 0, 1);
        _tile_dpbsud(4, 7, 1);
        if (pair) {
          _tile_loadd(2, b1, 64);
          _tile_dpbsud(5, 0, 2);
          _tile_dpbsud(6, 7, 2);
        }
      }
      if (i + 1 < steps) { /* meanwhile: the next step's weight into L1, unpacked if 4-bit */
        const uint8_t *next = STEP_WEIGHT(i + 1);
        if (four) {
          UNPACK_STEP(i + 1);
        } else {
          for (int64_t off = 0; off < span_bytes; off += 64) {
            _mm_prefetch((const char *)next + off, _MM_HINT_T0);
            _mm_prefetch((const char *)next + panel_bytes + off, _MM_HINT_T0);
          }
        }
      }
    }
    const int64_t end_prev = i > 0 ? ((i - 1) / pairs + 1) * cps * kc : 0; /* step i - 1 ends here */
    if (i > 0 && fold_starts(a, end_prev)) { /* fold step i - 1 (and the spans it carries) */
      const int64_t p = (i - 1) % pairs * 2, b = (end_prev - 1) / a->block;
      const int64_t at = ((nb0 + p) * nblocks + b) * 16; /* panel p's scales of block b */
      const int block_start = fold_holds_block_start(a, end_prev - 1);
      for (int q = 0; q < 2 && p + q < panels; q++) {
        const float *s = wt->scale + at + q * nblocks * 16, *sz = wt->scale_zero + at + q * nblocks * 16;
        fold_planes(sums[(i - 1) & 1][2 * q], 16, _mm512_loadu_ps(s), block_start ? _mm512_loadu_ps(sz) : _mm512_setzero_ps(),
                    a->xsum + b, nblocks, totals[p + q], rows);
      }
    }
    if (i < steps) {
      const int64_t p = i % pairs * 2;
      int32_t(*dst)[256] = fold_starts(a, (i / pairs + 1) * cps * kc) ? sums[i & 1] : carry[p / 2];
      _tile_stored(3, dst[0], 64);
      _tile_stored(4, dst[1], 64);
      _tile_stored(5, dst[2], 64);
      _tile_stored(6, dst[3], 64);
    }
  }
#undef STEP_WEIGHT
#undef UNPACK_STEP
  for (int p = 0; p < panels; p++) write_outputs(a, wt, totals[p], 0, rows, nb0 + p);
}
