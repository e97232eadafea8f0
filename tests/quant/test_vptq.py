"""VPTQ checkpoints hand-packed from the documented layout (VPTQ's packer needs a GPU): every
rank's decoded slice at TP 1-4 equals the slice of the full decode bit for bit; the full decode
equals the vptq package's own pure-torch `dequant` (vptq.ops.quant_gemm, loaded without the
package's model tools, whose imports need sentence_transformers); row splits are refused, naming
why, where the permutation scatters a rank's columns; bad checkpoints fail naming tensor / layer."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from engine.weights import Weights
from parallel.sharding import column_shard, row_shard
from quant import get_loader
from quant.base import QuantConfigError
from quant.vptq.config import VptqLayer
from quant.vptq.packer import VptqCodes, VptqPacker
from tests.quant.checkpoints import CountingWeights, expected_slice, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "model.layers.0.mlp.down_proj"
N, K = 60, 96  # vectors of 8 (and 4) along N straddle rank boundaries at TP 3 / 4; K / TP = 96, 48, 32, 24

# name -> layer fields: outliers 16 columns (vectors of 4, 64 centroids) + 2 groups of 40 columns
CONFIGS = {
    "residual-outliers-perm-norm": dict(vector_lens=[4, 8], num_centroids=[64, 256], num_res_centroids=[-1, 16],
                                        group_num=2, group_size=40, outlier_size=16, enable_norm=True,
                                        enable_perm=True, is_indice_packed=True, indices_as_float=False),
    "residual-outliers-norm-noperm": dict(vector_lens=[4, 8], num_centroids=[64, 1024],
                                          num_res_centroids=[-1, 256], group_num=2, group_size=40, outlier_size=16,
                                          enable_norm=True, enable_perm=False, is_indice_packed=True,
                                          indices_as_float=False),
    "plain-1group": dict(vector_lens=[-1, 6], num_centroids=[-1, 512], num_res_centroids=[-1, -1], group_num=1,
                         group_size=96, outlier_size=0, enable_norm=False, enable_perm=False, is_indice_packed=True,
                         indices_as_float=False),
    "unpacked-float-indices-residual": dict(vector_lens=[-1, 4], num_centroids=[-1, 128],
                                            num_res_centroids=[-1, 128], group_num=3, group_size=32,
                                            outlier_size=0, enable_norm=True, enable_perm=False,
                                            is_indice_packed=False, indices_as_float=True),
}


def qconfig(name: str, prefix: str = PREFIX) -> dict:
    return {"quant_method": "vptq", "config_for_layers": {prefix: CONFIGS[name]}, "shared_layer_config": {}}


def random_codes(layer: VptqLayer, n: int, k: int, seed: int, perm: torch.Tensor | None = None) -> VptqCodes:
    gen = torch.Generator().manual_seed(seed)
    G, gs, vl = layer.group_num, layer.group_size, layer.vector_len
    ni = -(-n // vl)

    def books(*shape):
        return (torch.randn(*shape, generator=gen) * 0.1).half().float()

    c = VptqCodes(layer, n, books(G, layer.num_centroids, vl),
                  torch.randint(0, layer.num_centroids, (G, ni, gs), generator=gen))
    if layer.has_residual:
        c.res_centroids = books(G, layer.num_res_centroids, vl) * 0.1
        c.res_indices = torch.randint(0, layer.num_res_centroids, (G, ni, gs), generator=gen)
    if layer.has_outliers:
        c.outlier_centroids = books(layer.num_outlier_centroids, layer.outlier_vector_len) * 4
        c.outlier_indices = torch.randint(0, layer.num_outlier_centroids,
                                          (-(-n // layer.outlier_vector_len), layer.outlier_size), generator=gen)
    if layer.enable_perm:
        c.perm = torch.randperm(k, generator=gen) if perm is None else perm
    if layer.enable_norm:
        c.weight_scale = (torch.rand(k, generator=gen) + 0.5).half().float()
        c.weight_bias = (torch.randn(k, generator=gen) * 0.01).half().float()
    return c


def _u16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).to(torch.uint16).view(torch.int16)


def _stream(entries: torch.Tensor, bits: int) -> torch.Tensor:
    """Written here with Python integers: row value = sum(entry_j << j*bits), cut into 32-bit words."""
    lead, count = entries.shape[:-1], entries.shape[-1]
    words = -(-count * bits // 32)
    out = []
    for row in entries.reshape(-1, count).tolist():
        value = sum(e << (j * bits) for j, e in enumerate(row))
        out.append([((value >> (32 * w)) & 0xFFFFFFFF) for w in range(words)])
    return torch.tensor(out, dtype=torch.int64).to(torch.uint32).view(torch.int32).reshape(*lead, words)


def hand_packed(prefix: str, c: VptqCodes) -> dict[str, torch.Tensor]:
    L, t = c.layer, {}
    G = L.group_num
    t[f"{prefix}.centroids.weight"] = c.centroids.reshape(G, -1).half()
    if L.has_residual:
        t[f"{prefix}.res_centroids.weight"] = c.res_centroids.reshape(G, -1).half()
    as_float = (lambda x: _u16(x).view(torch.float16)) if L.indices_as_float else _u16
    if L.is_indice_packed:
        entries = c.indices | (c.res_indices << L.index_bits if L.has_residual else 0)
        t[f"{prefix}.indices"] = _stream(entries, L.index_bits + L.res_bits)
    else:
        t[f"{prefix}.indices"] = as_float(c.indices)
        if L.has_residual:
            t[f"{prefix}.res_indices"] = as_float(c.res_indices)
    if L.has_outliers:
        t[f"{prefix}.outlier_centroids.weight"] = c.outlier_centroids.reshape(1, -1).half()
        t[f"{prefix}.outlier_indices"] = as_float(c.outlier_indices[None])
    if L.enable_perm:
        t[f"{prefix}.perm"] = _u16(c.perm)
    if L.enable_norm:
        t[f"{prefix}.weight_scale"], t[f"{prefix}.weight_bias"] = c.weight_scale.half(), c.weight_bias.half()
    return t


def vptq_package_dequant():
    """vptq.ops.quant_gemm.dequant, pure torch, imported with a bare `vptq` package (its __init__
    imports model tools) and stubs for the model tools' imports that are not installed here."""
    spec = importlib.util.find_spec("vptq")
    if spec is None:
        return None
    root = Path(spec.origin).parent
    pkg = types.ModuleType("vptq")
    pkg.__path__ = [str(root)]
    stubs = {"vptq": pkg}
    if importlib.util.find_spec("sentence_transformers") is None:
        st = types.ModuleType("sentence_transformers.SentenceTransformer")
        st.SentenceTransformer = object
        stubs.update({"sentence_transformers": types.ModuleType("sentence_transformers"),
                      "sentence_transformers.SentenceTransformer": st})
    with mock.patch.dict(sys.modules, stubs):
        for name, path in (("vptq.utils.pack", "utils/pack.py"), ("vptq.ops.quant_gemm", "ops/quant_gemm.py")):
            s = importlib.util.spec_from_file_location(name, root / path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
    return mod.dequant


def package_decode(t: dict, prefix: str, L: VptqLayer, n: int) -> torch.Tensor | None:
    dequant = vptq_package_dequant()
    if dequant is None:
        return None

    def get(s):
        return t.get(f"{prefix}.{s}")

    def books(s, count, vl, groups):
        return None if get(s) is None else get(s).float().reshape(groups, count, vl)

    idx = get("indices") if L.is_indice_packed else get("indices").view(torch.int16)
    ridx = get("res_indices")
    return dequant(
        indices=idx, centroids=books("centroids.weight", L.num_centroids, L.vector_len, L.group_num),
        outlier_indices=None if get("outlier_indices") is None else get("outlier_indices").view(torch.int16),
        outlier_centroids=books("outlier_centroids.weight", L.num_outlier_centroids, L.outlier_vector_len, 1),
        res_indices=None if ridx is None else ridx.view(torch.int16),
        res_centroids=books("res_centroids.weight", L.num_res_centroids, L.vector_len, L.group_num),
        perm=get("perm"), weight_scale=None if get("weight_scale") is None else get("weight_scale").float(),
        weight_bias=None if get("weight_bias") is None else get("weight_bias").float(),
        is_indice_packed=L.is_indice_packed, enable_outlier=L.has_outliers, enable_residual=L.has_residual,
        enable_perm=L.enable_perm, enable_norm=L.enable_norm, num_centroids=L.num_centroids,
        num_outlier_centroids=L.num_outlier_centroids, num_res_centroids=L.num_res_centroids,
        padding=-n % L.vector_len, outlier_padding=-n % L.outlier_vector_len if L.has_outliers else 0,
        num_codebooks=L.group_num, group_size=L.group_size, outlier_size=L.outlier_size, vector_len=L.vector_len,
        outlier_vector_len=L.outlier_vector_len)


@pytest.fixture(scope="module", params=list(CONFIGS))
def layer(request, tmp_path_factory):
    L = VptqLayer.parse(PREFIX, CONFIGS[request.param])
    codes = random_codes(L, N, K, seed=len(request.param))
    t = hand_packed(PREFIX, codes)
    path = save_checkpoint(tmp_path_factory.mktemp(request.param), t, qconfig(request.param))
    return request.param, L, path, t, codes.dequantize()


def test_full_decode_equals_the_vptq_package(layer):
    name, L, path, t, full = layer
    ref = package_decode(t, PREFIX, L, N)
    if ref is None:
        pytest.skip("vptq package not installed: VptqCodes.dequantize (the documented formula) is the reference")
    assert torch.equal(full, ref)
    got = get_loader(qconfig(name)).load_linear(Weights(path), column_shard([(PREFIX, N)], K, 0, 1)).dequantize()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_column_slices_equal_the_full_decode(layer, tp):
    name, L, path, t, full = layer
    loader, weights = get_loader(qconfig(name)), CountingWeights(path)
    idx_bytes = t[f"{PREFIX}.indices"].numel() * 4 if L.is_indice_packed else t[f"{PREFIX}.indices"].numel() * 2
    for rank in range(tp):
        shard = column_shard([(PREFIX, N)], K, rank, tp)
        weights.reset()
        got = loader.load_linear(weights, shard).dequantize()
        assert torch.equal(got, expected_slice({PREFIX: full}, shard)), (name, tp, rank)
        # only the rank's vector rows of the indices (one more where a vector straddles ranks)
        vectors = -(-N // L.vector_len)
        assert weights.read_by_name[f"{PREFIX}.indices"] <= idx_bytes * (-(-N // tp // L.vector_len) + 1) / vectors


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_row_slices_equal_the_full_decode(layer, tp):
    name, L, path, t, full = layer
    loader, weights = get_loader(qconfig(name)), Weights(path)
    for rank in range(tp):
        shard = row_shard(PREFIX, K, N, rank, tp)
        if L.enable_perm and tp > 1:  # a random permutation scatters every rank's columns
            with pytest.raises(QuantConfigError, match=rf"vptq layer {PREFIX}: cannot split its in-features across "
                                                       rf"{tp} ranks: enable_perm=true .*not one contiguous range"):
                loader.load_linear(weights, shard)
            continue
        got = loader.load_linear(weights, shard).dequantize()
        assert torch.equal(got, expected_slice({PREFIX: full}, shard)), (name, tp, rank)


@pytest.mark.parametrize("tp", [2, 3])
def test_row_split_with_a_block_local_perm(tmp_path, tp):
    """A perm that keeps each rank's in-features among one range of internal columns (it permutes
    within TP blocks, and the blocks among themselves) splits cleanly: each rank reads its columns' groups."""
    L = VptqLayer.parse(PREFIX, CONFIGS["residual-outliers-perm-norm"])
    gen = torch.Generator().manual_seed(7)
    width = K // tp
    order = torch.randperm(tp, generator=gen)
    perm = torch.cat([b * width + torch.randperm(width, generator=gen) for b in order.tolist()])
    codes = random_codes(L, N, K, seed=9, perm=perm)
    path = save_checkpoint(tmp_path / "ckpt", hand_packed(PREFIX, codes))
    loader, weights, full = get_loader(qconfig("residual-outliers-perm-norm")), Weights(path), codes.dequantize()
    for rank in range(tp):
        shard = row_shard(PREFIX, K, N, rank, tp)
        got = loader.load_linear(weights, shard)
        assert torch.equal(got.dequantize(), expected_slice({PREFIX: full}, shard)), (tp, rank)
    assert full.shape == (N, K)


def test_packer_writes_the_documented_layout():
    for name, fields in CONFIGS.items():
        L = VptqLayer.parse(PREFIX, fields)
        codes = random_codes(L, N, K, seed=4)
        packer = VptqPacker(packed=L.is_indice_packed)
        packed, want = packer.pack(PREFIX, codes, torch.float16), hand_packed(PREFIX, codes)
        assert packed.keys() == want.keys(), name
        for k in want:
            assert packed[k].dtype == want[k].dtype or L.indices_as_float, (name, k)
            assert torch.equal(packed[k].view(want[k].dtype), want[k]), (name, k)
        assert packer.quantization_config()["config_for_layers"][PREFIX]["group_size"] == fields["group_size"]


def test_quantizer_round_trip():
    """quantize_vptq on a Gaussian matrix with outlier columns: norm, perm (the outliers go first),
    main + residual codebooks; the decode is within the expected k-means error (measured 0.20)."""
    from quant.vptq.quantize import quantize_vptq

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    w[:, 5] *= 20  # an outlier column
    L = VptqLayer.parse("l", CONFIGS["residual-outliers-perm-norm"])
    codes = quantize_vptq(w, L)
    assert 5 in codes.perm[:16].tolist()
    err = ((codes.dequantize() - w).norm() / w.norm()).item()
    assert err < 0.35


# -- bad input -----------------------------------------------------------------------------------


def _bad(tmp_path, name="residual-outliers-norm-noperm", drop=None, fields=None):
    L = VptqLayer.parse(PREFIX, CONFIGS[name])
    t = hand_packed(PREFIX, random_codes(L, N, K, seed=1))
    if drop:
        del t[f"{PREFIX}.{drop}"]
    cfg = {"quant_method": "vptq", "config_for_layers": {PREFIX: dict(CONFIGS[name], **(fields or {}))}}
    return get_loader(cfg), Weights(save_checkpoint(tmp_path / "bad", t))


@pytest.mark.parametrize("drop", ["centroids.weight", "res_centroids.weight", "outlier_centroids.weight",
                                  "weight_scale"])
def test_missing_codebook_names_the_tensor(tmp_path, drop):
    loader, weights = _bad(tmp_path, drop=drop)
    with pytest.raises(QuantConfigError, match=rf"tensor {PREFIX}\.{drop} is missing from the vptq checkpoint"):
        loader.load_linear(weights, column_shard([(PREFIX, N)], K, 0, 1))


def test_group_layout_that_does_not_cover_in_features(tmp_path):
    loader, weights = _bad(tmp_path, fields={"group_size": 32})
    with pytest.raises(QuantConfigError, match=rf"vptq layer {PREFIX}: outlier_size 16 \+ group_num 2 x group_size "
                                               r"32 = 80 columns, but in_features is 96"):
        loader.load_linear(weights, column_shard([(PREFIX, N)], K, 0, 1))


def test_layer_without_config_and_bad_fields(tmp_path):
    loader, weights = _bad(tmp_path)
    with pytest.raises(QuantConfigError, match=rf"no entry for layer {PREFIX} .*shared_layer_config by 'down_proj'"):
        get_loader({"quant_method": "vptq", "config_for_layers": {"model.layers.1.mlp.down_proj": CONFIGS[
            "plain-1group"]}}).load_linear(weights, column_shard([(PREFIX, N)], K, 0, 1))
    with pytest.raises(QuantConfigError, match=rf"vptq layer {PREFIX}: field vector_lens=\[8\] must be a pair"):
        get_loader({"quant_method": "vptq", "config_for_layers": {PREFIX: dict(CONFIGS["plain-1group"],
                                                                               vector_lens=[8])}})
    with pytest.raises(QuantConfigError, match="num_centroids asks for 131072 centroids"):
        get_loader({"quant_method": "vptq", "config_for_layers": {PREFIX: dict(CONFIGS["plain-1group"],
                                                                               num_centroids=[-1, 1 << 17])}})


# -- the default model in VPTQ (4 bits per weight: vectors of 4, 256 centroids + 256 residual), end to end


def default_model_layer(prefix: str, in_features: int) -> VptqLayer:
    """Column-parallel layers (q/k/v/gate/up, K 576): 64 outlier columns, perm, norm, 2 groups of 256.
    Row-parallel layers (o_proj K 576, down_proj K 1536): no perm (a row split needs the rank's
    columns together), norm, 2 groups that straddle the TP=3 ranks' column ranges."""
    column = not prefix.endswith(("o_proj", "down_proj"))
    fields = dict(vector_lens=[4 if column else -1, 4], num_centroids=[256 if column else -1, 256],
                  num_res_centroids=[-1, 256], group_num=2, group_size=(in_features - 64) // 2 if column else
                  in_features // 2, outlier_size=64 if column else 0, enable_norm=True, enable_perm=column,
                  is_indice_packed=True, indices_as_float=False)
    return VptqLayer.parse(prefix, fields)


@pytest.fixture(scope="module")
def default_model_run(default_model_dir, tmp_path_factory):
    import zlib

    from quant.vptq.quantize import quantize_vptq
    from tests.quant.codebook_e2e import run_format

    def quantize(prefix, w):
        return quantize_vptq(w, default_model_layer(prefix, w.shape[1]), iters=3, seed=zlib.crc32(prefix.encode()))

    return run_format(default_model_dir, tmp_path_factory.mktemp("vptq") / "ckpt", VptqPacker(), quantize)


# The default-model run (~90 s on 2 cores, most of it k-means) only with QSHARD_ALL_FORMATS=1, as
# AQLM's: both codebook formats' slices and kernel are checked above on every run; the suite keeps
# within its 25 minutes.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QSHARD_ALL_FORMATS") != "1", reason="QSHARD_ALL_FORMATS=1 runs it")
def test_default_model_tp3_equals_tp1_and_matches_transformers(default_model_run):
    from tests.quant.codebook_e2e import check_run

    r = default_model_run
    layers = r.config["config_for_layers"]
    assert r.layers == len(layers) == 210
    assert sum(cfg["enable_perm"] for cfg in layers.values()) == 150 and sum(
        cfg["outlier_size"] > 0 for cfg in layers.values()) == 150
    check_run("vptq", r)


def test_loaded_layout_runs_on_the_triton_kernel(layer, monkeypatch):
    """The loader's layout (TP 2 column rank 1: a straddling vector, outliers, perm, norm) through
    the codebook Triton kernel (interpreted on CPU) equals the dequantized matmul to fp32 rounding."""
    import kernels

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, L, path, t, full = layer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    linear = get_loader(qconfig(name)).load_linear(Weights(path, device=dev), column_shard([(PREFIX, N)], K, 1, 2))
    prepared = kernels.prepare(linear.prepared.layout, torch.float32, backend="triton")
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0)).to(dev)
    want = x.double() @ linear.dequantize().double().T
    got = kernels.linear(x, prepared).double()
    assert ((got - want).norm() / want.norm()).item() < 1e-6
