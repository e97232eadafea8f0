"""HQQ checkpoints written by the hqq package itself (HQQLinear's state dict, as transformers saves
it): every rank's weight at TP 1-4 equals the slice of hqq's own dequantization bit for bit (its
compute dtype, float16 here), for 1/2/3/4/8 bits and group sizes that do and do not split at the
rank boundaries; the fused matmul (GPTQ kernels + per-group float-zero offsets) matches the exact
float64 weight; per-layer-tag configs, skip_modules and bad input."""

from __future__ import annotations

import pytest
import torch

from parallel.sharding import column_shard, qkv_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.common.dense import DenseLinear
from quant.common.float_zero import FloatZeroLinear
from tests.quant.checkpoints import CountingWeights, save_checkpoint

hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="the hqq package makes the test checkpoints")

pytestmark = pytest.mark.usefixtures("one_thread")


def weight_params(nbits: int, group_size: int | None, axis: int = 1, **extra) -> dict:
    return {"weight_quant_params": {"nbits": nbits, "channel_wise": True, "group_size": group_size, "optimize": True,
                                    "round_zero": nbits == 4, "axis": axis, "view_as_float": False, **extra},
            "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}


def hqq_config(nbits: int = 4, group_size: int | None = 64, skip=("lm_head",), **extra) -> dict:
    return {"quant_method": "hqq", "quant_config": weight_params(nbits, group_size, **extra), "skip_modules": list(skip)}


def hqq_layer(prefix: str, weight: torch.Tensor, nbits: int, group_size: int, view_as_float: bool = False):
    """(tensors named `{prefix}.*` as transformers saves an HQQLinear, hqq's own dequantized weight)."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    cfg = hqq_quantize.BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1, view_as_float=view_as_float)
    h = hqq_quantize.HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu")
    tensors = {f"{prefix}.{k}": v for k, v in h.state_dict().items() if isinstance(v, torch.Tensor)}
    return tensors, h.dequantize().float()


def exact_weight(tensors: dict, prefix: str, n: int, k: int) -> torch.Tensor:
    """(q - zero) * scale in float64 from the stored tensors, through hqq's own unpacking."""
    meta = {"packing": bytes(tensors[f"{prefix}.packing"].tolist()).decode(), "view_as_float": False,
            "nbits": int(tensors[f"{prefix}.nbits"]), "group_size": int(tensors[f"{prefix}.group_size"]),
            "axis": 1, "shape": (n, k)}
    q = hqq_quantize.Quantizer.unpack[meta["packing"]](tensors[f"{prefix}.W_q"], dtype=torch.float64)
    q = q[: n * k // meta["group_size"]]
    return ((q - tensors[f"{prefix}.zero"].double()) * tensors[f"{prefix}.scale"].double()).reshape(n, k)


def shards(n: int, k: int, tp: int):
    for r in range(tp):
        yield "column", r, column_shard([("l", n)], k, r, tp)
        yield "row", r, row_shard("l", k, n, r, tp)


def check_rank(linear, full, exact, kind, shard, x_gen):
    if kind == "column":
        b = shard.blocks[0]
        want, want_exact = full[b.start:b.stop], exact[b.start:b.stop]
    else:
        want, want_exact = full[:, shard.k_start:shard.k_stop], exact[:, shard.k_start:shard.k_stop]
    assert torch.equal(linear.dequantize(), want)  # hqq's own numbers, bit for bit
    x = torch.randn(3, want.shape[1], generator=x_gen)
    y = linear(x).double()
    ref = x.double() @ want_exact.T
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("nbits,group_size", [(1, 16), (2, 32), (3, 24), (4, 64), (4, 48), (8, 16)])
def test_every_rank_equals_the_slice_of_hqqs_dequantization(tmp_path, nbits, group_size):
    # K = 192: group 24/48 puts TP=3/4 row boundaries (64, 48) inside or on groups, 64 inside at TP 2/4
    n, k = 96, 192
    gen = torch.Generator().manual_seed(nbits * 100 + group_size)
    tensors, full = hqq_layer("l", torch.randn(n, k, generator=gen) * 0.05, nbits, group_size)
    exact = exact_weight(tensors, "l", n, k)
    path = save_checkpoint(tmp_path, tensors)
    loader = get_loader(hqq_config(nbits, group_size))
    for tp in (1, 2, 3, 4):
        for kind, r, shard in shards(n, k, tp):
            linear = loader.load_linear(CountingWeights(path, dtype=torch.float32), shard)
            assert isinstance(linear, FloatZeroLinear) and linear.offsets is not None  # hqq zeros are floats
            check_rank(linear, full, exact, kind, shard, gen)


def test_column_ranks_read_only_the_words_holding_their_codes(tmp_path):
    n, k, gs = 64, 128, 32  # 4-bit, G = 256 groups: W_q [128, 32], rows 0-31 in high nibbles, 32-63 in low
    tensors, _ = hqq_layer("l", torch.randn(n, k) * 0.05, 4, gs)
    path = save_checkpoint(tmp_path, tensors)
    loader = get_loader(hqq_config(4, gs))
    whole = tensors["l.W_q"].numel()
    for tp, fraction in ((1, 1.0), (2, 1.0), (4, 0.5)):
        for r in range(tp):
            w = CountingWeights(path, dtype=torch.float32)
            loader.load_linear(w, column_shard([("l", n)], k, r, tp))
            assert w.read_by_name["l.W_q"] == whole * fraction  # TP=4: a quarter of the rows of each chunk
            assert w.read_by_name["l.scale"] == 2 * n * k // gs // tp  # float16 [G, 1], the rank's rows


def test_view_as_float_and_fused_qkv_gate_up(tmp_path):
    hidden, heads, kv, hd, inter = 128, 4, 2, 32, 192
    gen = torch.Generator().manual_seed(7)
    tensors, full = {}, {}
    for name, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd), ("gate", inter), ("up", inter)):
        t, f = hqq_layer(name, torch.randn(rows, hidden, generator=gen) * 0.05, 4, 32, view_as_float=True)
        tensors.update(t)
        full[name] = f
    assert tensors["q.W_q"].dtype == torch.float16  # the codes' bytes seen as float16
    path = save_checkpoint(tmp_path, tensors)
    loader = get_loader(hqq_config(4, 32, view_as_float=True))
    for tp in (1, 2, 4):
        for r in range(tp):
            w = CountingWeights(path, dtype=torch.float32)
            for shard in (qkv_shard(["q", "k", "v"], hidden, heads, kv, hd, r, tp),
                          column_shard([("gate", inter), ("up", inter)], hidden, r, tp)):
                want = torch.cat([full[b.source][b.offset + b.start: b.offset + b.stop] for b in shard.blocks])
                assert torch.equal(loader.load_linear(w, shard).dequantize(), want)


def test_per_layer_tag_config_and_skip_modules(tmp_path):
    gen = torch.Generator().manual_seed(3)
    q, q_full = hqq_layer("model.layers.0.self_attn.q_proj", torch.randn(64, 128, generator=gen) * 0.05, 4, 32)
    d, d_full = hqq_layer("model.layers.0.mlp.down_proj", torch.randn(128, 64, generator=gen) * 0.05, 2, 16)
    tensors = {**q, **d, "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 128, generator=gen),
               "lm_head.weight": torch.randn(256, 128, generator=gen)}
    path = save_checkpoint(tmp_path, tensors)
    config = {"quant_method": "hqq", "skip_modules": ["lm_head"],
              "quant_config": {"self_attn.q_proj": weight_params(4, 32), "mlp.down_proj": weight_params(2, 16)}}
    loader = get_loader(config)
    w = CountingWeights(path, dtype=torch.float32)
    ql = loader.load_linear(w, column_shard([("model.layers.0.self_attn.q_proj", 64)], 128, 1, 2))
    dl = loader.load_linear(w, row_shard("model.layers.0.mlp.down_proj", 64, 128, 0, 2))
    assert (ql.bits, dl.bits) == (4, 2)
    assert torch.equal(ql.dequantize(), q_full[32:]) and torch.equal(dl.dequantize(), d_full[:, :32])
    kl = loader.load_linear(w, column_shard([("model.layers.0.self_attn.k_proj", 32)], 128, 0, 1))
    head = loader.load_linear(w, column_shard([("lm_head", 256)], 128, 0, 2))
    assert isinstance(kl, DenseLinear) and isinstance(head, DenseLinear)  # untagged / skipped: float
    assert torch.equal(head.dequantize(), tensors["lm_head.weight"][:128])
    wrong = dict(config, quant_config={"self_attn.q_proj": weight_params(3, 32)})
    with pytest.raises(QuantConfigError, match=r"model.layers.0.self_attn.q_proj.nbits says nbits=4 but the "
                                               r"quantization_config gives layer model.layers.0.self_attn.q_proj nbits=3"):
        get_loader(wrong).load_linear(w, column_shard([("model.layers.0.self_attn.q_proj", 64)], 128, 0, 1))
    skipped = dict(config, skip_modules=["q_proj"])
    with pytest.raises(QuantConfigError, match=r"layer model.layers.0.self_attn.q_proj is in skip_modules"):
        get_loader(skipped).load_linear(w, column_shard([("model.layers.0.self_attn.q_proj", 64)], 128, 0, 1))


@pytest.mark.parametrize("change,message", [
    (dict(nbits=7), r"field quant_config.weight_quant_params.nbits=7 is not supported; supported: 1, 2, 3, 4, 5, 6, 8"),
    (dict(axis=0), r"field quant_config.weight_quant_params.axis=0 is not supported: axis-0 groups run down"),
    (dict(group_size=-8), r"group_size=-8 must be a positive integer"),
    (dict(channel_wise=False), r"channel_wise=False is not supported"),
])
def test_bad_configs_name_the_field(change, message):
    config = hqq_config()
    config["quant_config"]["weight_quant_params"].update(change)
    with pytest.raises(QuantConfigError, match=message):
        get_loader(config)


def test_bad_tensors_name_the_tensor(tmp_path):
    tensors, _ = hqq_layer("l", torch.randn(32, 64) * 0.05, 4, 16)
    shard = column_shard([("l", 32)], 64, 0, 1)
    cases = [
        ({k: v for k, v in tensors.items() if k != "l.zero"}, r"tensor l.zero is missing from the hqq checkpoint"),
        ({**tensors, "l.nbits": torch.tensor(2, dtype=torch.int32)}, r"tensor l.nbits says nbits=2 but the "
                                                                      r"quantization_config gives layer l nbits=4"),
        ({**tensors, "l.W_q": tensors["l.W_q"][:-1]}, r"tensor l.W_q has shape \[63, 16\], expected \[64, 16\]"),
        ({**tensors, "l.shape": torch.tensor([32, 32])}, r"tensor l.shape is \[32, 32\], but layer l is \[32, 64\]"),
        ({**tensors, "l.scale": tensors["l.scale"][:-1]}, r"tensor l.scale has shape \[127, 1\], expected \[128, 1\]"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = save_checkpoint(tmp_path / str(i), bad)
        with pytest.raises(QuantConfigError, match=message):
            get_loader(hqq_config(4, 16)).load_linear(CountingWeights(path, dtype=torch.float32), shard)


# -- the default model, quantized by hqq, end to end ---------------------------------------------


@pytest.mark.slow
def test_default_model_tp3_equals_tp1_and_transformers(default_model_dir, tmp_path):
    """SmolLM2 quantized by hqq (4-bit, group 64, axis 1, per-layer-tag config with down_proj at
    3 bits): qshard TP=3 tokens == TP=1; logits vs transformers on the twin decoded in float32
    (transformers 5.24 cannot load HQQ checkpoints: 'not available yet')."""
    from tests.quant import package_e2e

    tensors, twin = {}, {}
    for name, t in package_e2e.float_tensors(default_model_dir).items():
        if not package_e2e.is_linear(name):
            tensors[name] = t
            continue
        prefix = name[: -len(".weight")]
        bits = 3 if prefix.endswith("down_proj") else 4
        layer, _ = hqq_layer(prefix, t.float(), bits, 64)
        tensors.update(layer)
        twin[name] = exact_weight(layer, prefix, *t.shape).float()
    config = {"quant_method": "hqq", "skip_modules": ["lm_head"],
              "quant_config": {tag: weight_params(3 if tag == "mlp.down_proj" else 4, 64)
                               for tag in package_e2e.LINEARS}}
    path = package_e2e.write_checkpoint(default_model_dir, tmp_path / "hqq", tensors, config)
    package_e2e.check("hqq 4-bit g64 (down_proj 3-bit)", package_e2e.run(default_model_dir, path, twin))


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 16), (4, 64), (8, 32)])
def test_packer_writes_what_hqq_and_qshard_read(tmp_path, bits, group_size):
    """HqqPacker's tensors from an RTN result: hqq's own HQQLinear.load_state_dict reads them and its
    dequantize() equals (q - z) * s in float16; qshard's loader at TP 1-4 equals its slices."""
    from quant.calibrate import QuantArgs, rtn_quantize
    from quant.hqq.packer import HqqPacker

    n, k = 96, 192
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits)) * 0.05
    r = rtn_quantize(w, QuantArgs(bits=bits, group_size=group_size, sym=False))
    packer = HqqPacker(bits, group_size)
    tensors = packer.pack("l", r, torch.float16)
    g = torch.arange(k) // group_size
    want = ((r.codes.half() - r.zeros[:, g].half()) * r.scales[:, g].half()).float()
    h = hqq_quantize.HQQLinear(None, quant_config=None, compute_dtype=torch.float16, device="cpu",
                               initialize=False)
    h.load_state_dict({key[2:]: v.clone() for key, v in tensors.items()})
    assert torch.equal(h.dequantize().float(), want)
    path = save_checkpoint(tmp_path, tensors)
    loader = get_loader(packer.quantization_config())
    for tp in (1, 2, 3, 4):
        for kind, r_, shard in shards(n, k, tp):
            linear = loader.load_linear(CountingWeights(path, dtype=torch.float32), shard)
            b = shard.blocks[0]
            expect = want[b.start:b.stop] if kind == "column" else want[:, shard.k_start:shard.k_stop]
            assert torch.equal(linear.dequantize(), expect)
            assert linear.offsets is None  # integer zeros: the plain GPTQ kernels, no offset term
