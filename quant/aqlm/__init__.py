"""AQLM checkpoints (additive quantization, Vahe1994/AQLM; transformers' AqlmConfig).

Per linear (N out-features, K in-features, og x ig weights per code cell, C codebooks of 2^b):
    codes     int16 / int8 [N/og, K/ig, C]   code values stored signed (v - 2^b when v >= 2^(b-1))
    codebooks float [C, 2^b, og, ig]
    scales    float [N/og, 1, 1, 1]
    W[o*og + i, g*ig + j] = scales[o] * sum_c codebooks[c, codes[o, g, c] mod 2^b, i, j]
A column-parallel rank reads its out-groups of codes and scales, a row-parallel rank its
in-groups of codes ((K/TP) must be whole in-groups); codebooks are replicated on every rank, and
each part of a fused layer keeps its own.
"""
