/* Work items that walk K for up to four (A tile, panel) pairs: one A tile of digits (M <= 8) or
 * bf16 tiles (M > 16).
 * Part of cpu_amx.c, which includes it after its types and constants. */

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

/* totals[sum i][row m of the tile] += block b's sums (digit planes joined) times the block's
 * scales (`scale`: the item's first panel). */
static inline void fold(const act_t *a, const weight_t *wt, const void *sums, float *totals, int64_t t0, int tiles,
                        int64_t nb0, int panels, int64_t b, int with_zero) {
  const int64_t nblocks = a->K / a->block;
  for (int t = 0; t < tiles; t++) {
    const int64_t m0 = (t0 + t) * a->per_tile, count = a->M - m0 < a->per_tile ? a->M - m0 : a->per_tile;
    const float *xsum = a->xsum + m0 * nblocks + b;
    for (int p = 0; p < panels; p++) {
      const int i = t * panels + p;
      const int64_t at = ((nb0 + p) * nblocks + b) * 16; /* panel's scales of block b */
      const __m512 s = _mm512_loadu_ps(wt->scale + at);
      const __m512 sz = with_zero ? _mm512_loadu_ps(wt->scale_zero + at) : _mm512_setzero_ps();
      float *tot = totals + i * 256;
      if (a->digits) {
        fold_planes((const int32_t *)sums + i * 256, 16 * PLANES, s, sz, xsum, nblocks, tot, count);
      } else { /* the bf16 path's codes carry the offset: it joins the zero point */
        const __m512 s_zero = with_zero ? _mm512_fmadd_ps(_mm512_set1_ps(wt->offset), s, sz) : sz;
        const float *c = (const float *)sums + i * 256;
        for (int64_t r = 0; r < count; r++) {
          const __m512 v = _mm512_fmadd_ps(s, _mm512_load_ps(c + 16 * r), _mm512_load_ps(tot + 16 * r));
          _mm512_store_ps(tot + 16 * r, _mm512_fnmadd_ps(s_zero, _mm512_set1_ps(xsum[r * nblocks]), v));
        }
      }
    }
  }
}

/* One work item: A tiles t0 .. t0 + tiles - 1 times panels nb0 .. nb0 + panels - 1 (16 columns
 * each), tiles * panels <= 4, walking K. Each fold's sums are scaled into fp32 totals right away
 * (in L1), with the block's zero point, and the row scales are applied at the end. */
static void amx_item(const act_t *a, const weight_t *wt, int64_t t0, int tiles, int64_t nb0, int panels) {
  const int64_t K = a->K, kc = a->kc, chunks = K / kc;
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
  for (int64_t k = 0; k < chunks; k++) {
    if (fold_starts(a, k * kc)) zero_sums(sums);
    {
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
      }
      for (int64_t j = 0; !digits && j < kc / 32; j++) { /* bf16: 32 k per A tile; 8-bit codes in two B planes */
        for (int p = 0; p < panels; p++) {
          b0[p] = unpacked[p][k & 1] + (four ? 512 * j : 1024 * j);
          b1[p] = unpacked[p][k & 1] + 1024 * j + 512;
        }
        const char *a_src = (const char *)a->xa + t0 * a_next + (k * (kc / 32) + j) * a->rows * 64;
        products(0, tiles, panels, a_src, a_next, a_row, b0, b1, four ? 1 : 2);
      }
    }
    if (fold_starts(a, (k + 1) * kc)) { /* the fold's sums end here: scale them into the totals */
      const int64_t b = k * kc / a->block;
      store_sums(sums, block_sums);
      fold(a, wt, block_sums, totals, t0, tiles, nb0, panels, b, fold_holds_block_start(a, k * kc));
    }
  }
  for (int t = 0; t < tiles; t++) {
    const int64_t m0 = (t0 + t) * a->per_tile, rows = a->M - m0 < a->per_tile ? a->M - m0 : a->per_tile;
    for (int p = 0; p < panels; p++) write_outputs(a, wt, totals + (t * panels + p) * 256, m0, rows, nb0 + p);
  }
}
