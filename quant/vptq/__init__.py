"""VPTQ checkpoints (vector post-training quantization, microsoft/VPTQ; transformers' VptqConfig).

Per linear (N out-features, K in-features; vectors of vl weights run along N):
    centroids.weight         [group_num, n * vl]     main codebook of each column group
    res_centroids.weight     [group_num, r * vl]     residual codebook (optional)
    outlier_centroids.weight [1, n_out * ovl]        codebook of the outlier columns (optional)
    indices  int32 [group_num, ceil(N/vl), ceil(gs * (ib + rb) / 32)]  per (group, vector row) a bit
             stream LSB first of gs entries res << ib | idx (is_indice_packed; else int16 [.., gs]
             indices and res_indices)
    outlier_indices int16 [1, ceil(N/ovl), outlier_size]
    perm int16 [K] (uint16 bits), weight_scale, weight_bias [K] (optional)
Internal weight Wint[i*vl + v, O + c*gs + j] = cent[c, idx, v] + res[c, ridx, v], padding rows
cropped, the outlier columns [0, O) in front; then W[:, perm[j]] = Wint[:, j] * s + b.
Column-parallel ranks take their vector rows (a vector straddling two ranks is read by both);
row-parallel ranks take the internal columns their in-features map to, which must be one
contiguous range: always without perm, and with perm only where it keeps each rank's columns
together; otherwise the load is refused, naming the layer.
"""
