/* Work items for plane-major digit tiles (9 <= M <= 16).
 * Part of cpu_amx.c, which includes it after its types and constants. */

#define MAX_ITEM_PANELS 4 /* measured: 4 to 8% faster than 8 or 16 for long blocks, the same for short */
#define SPAN_BYTES 256

/* What a span's end means for its sums: fold them (else carry them to the next span), into which
 * block's totals, and with the block's zero-point term or not. */
typedef struct {
  int starts, ends, with_zero;
  int64_t block;
} span_t;

static inline span_t span_at(const act_t *a, int64_t j, int64_t span_rows) {
  const int64_t k0 = j * span_rows, k1 = k0 + span_rows;
  const span_t s = {fold_starts(a, k0), fold_starts(a, k1), fold_holds_block_start(a, k1 - 1), k0 / a->block};
  return s;
}

/* A pipeline step: panels p, p + 1 of the item over span j (`pair`: p + 1 exists). */
typedef struct {
  int64_t j, p;
  int pair;
  span_t span;
  const uint8_t *w; /* panel p's weight for the span */
} step_t;

/* Plane-major digits (more rows of x than one A tile holds with their planes, up to 16): A tile
 * 0 holds digit plane 0 of every row, tile 7 plane 1. An item walks its panels two at a time
 * (tiles 1, 2), span by span, so that the span's x tiles stay in L1 while the weight streams past
 * (the earlier design walked K per item and read x from L2 for every weight tile: M = 16 took
 * 1.4-1.8x as long). The steps are pipelined: while AMX multiplies step i, the vector units
 * unpack step i + 1's 4-bit codes and fold step i - 1's sums (tiles 3, 4 and 5, 6) into the fp32
 * totals. Spans within one fold (long blocks) carry their int32 sums in memory instead. */
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
  const int64_t spans = chunks / cps;
  const int four = wt->bits == 4;
  _Alignas(64) uint8_t unpacked[2][2][SPAN_BYTES * 16]; /* [step parity][panel of the pair]: the span's B tiles */
  _Alignas(64) int32_t sums[2][4][256];                      /* [step parity][tile 3..6] */
  _Alignas(64) int32_t carry[MAX_ITEM_PANELS / 2][4][256];    /* a pair's sums between spans of one fold */
  _Alignas(64) float totals[MAX_ITEM_PANELS][256];
  memset(totals, 0, sizeof totals);
  /* steps walk the pairs of a span, then the next span; no divisions per step (they showed) */
  step_t cur = {0, 0, 1 < panels, span_at(a, 0, cps * kc), wt->w + nb0 * panel_bytes}, prev = cur;
#define UNPACK_STEP(st, parity)                                                                       \
  for (int q = 0; q < 1 + (st).pair; q++)                                                              \
    for (int64_t c = 0; c < cps; c++)                                                                 \
      unpack_digits((st).w + q * panel_bytes + c * chunk_bytes, kc, unpacked[parity][q] + c * kc * 16);
  if (four) UNPACK_STEP(cur, 0);
  for (int64_t i = 0; cur.j < spans || i > 0; i++) {
    const int active = cur.j < spans;
    step_t next = cur; /* the step after cur */
    if (active) {
      next.p += 2;
      next.w += 2 * panel_bytes;
      if (next.p >= panels) {
        next.p = 0, next.j++;
        next.w = wt->w + nb0 * panel_bytes + next.j * span_bytes;
        if (next.j < spans) next.span = span_at(a, next.j, cps * kc);
      }
      next.pair = next.p + 1 < panels;
    }
    if (active) { /* multiply step i */
      const uint8_t *w0 = cur.w, *w1 = w0 + panel_bytes;
      const int pair = cur.pair;
      if (cur.span.starts) {
        _tile_zero(3);
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
      } else {
        _tile_loadd(3, carry[cur.p / 2][0], 64);
        _tile_loadd(4, carry[cur.p / 2][1], 64);
        _tile_loadd(5, carry[cur.p / 2][2], 64);
        _tile_loadd(6, carry[cur.p / 2][3], 64);
      }
      const char *xa = (const char *)a->xa + cur.j * cps * a_chunk;
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
      if (next.j < spans) { /* meanwhile: the next step's weight into L1, unpacked if 4-bit */
        if (four) {
          UNPACK_STEP(next, (i + 1) & 1);
          /* and the step after next into L1 (its panels are 2 of 8 strided streams: the hardware
           * prefetchers miss them) */
          const uint8_t *after = next.w + 2 * panel_bytes;
          if (next.p + 2 >= panels) after = wt->w + nb0 * panel_bytes + (next.j + 1) * span_bytes;
          if (after < wt->w + (nb0 + panels) * panel_bytes)
            for (int64_t off = 0; off < span_bytes; off += 64) {
              _mm_prefetch((const char *)after + off, _MM_HINT_T0);
              _mm_prefetch((const char *)after + panel_bytes + off, _MM_HINT_T0);
            }
        } else {
          for (int64_t off = 0; off < span_bytes; off += 64) {
            _mm_prefetch((const char *)next.w + off, _MM_HINT_T0);
            _mm_prefetch((const char *)next.w + panel_bytes + off, _MM_HINT_T0);
          }
        }
      }
    }
    if (i > 0 && prev.span.ends) { /* fold step i - 1 (and the spans it carried) */
      const int64_t at = ((nb0 + prev.p) * nblocks + prev.span.block) * 16; /* panel p's scales of its block */
      for (int q = 0; q < 1 + prev.pair; q++) {
        const float *s = wt->scale + at + q * nblocks * 16, *sz = wt->scale_zero + at + q * nblocks * 16;
        fold_planes(sums[(i - 1) & 1][2 * q], 16, _mm512_loadu_ps(s), prev.span.with_zero ? _mm512_loadu_ps(sz) : _mm512_setzero_ps(),
                    a->xsum + prev.span.block, nblocks, totals[prev.p + q], rows);
      }
    }
    if (!active) break;
    int32_t(*dst)[256] = cur.span.ends ? sums[i & 1] : carry[cur.p / 2];
    _tile_stored(3, dst[0], 64);
    _tile_stored(4, dst[1], 64);
    _tile_stored(5, dst[2], 64);
    _tile_stored(6, dst[3], 64);
    prev = cur;
    cur = next;
  }
#undef UNPACK_STEP
  for (int p = 0; p < panels; p++) write_outputs(a, wt, totals[p], 0, rows, nb0 + p);
}
