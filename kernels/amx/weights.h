/* Packed weight chunks into B tiles, and prefetching them.
 * Part of cpu_amx.c, which includes it after its types and constants. */

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
