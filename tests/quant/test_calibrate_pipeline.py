"""The block-sequential calibration driver (quant.calibrate.pipeline), on a toy two-block model in
plain torch and on qshard's own Llama through engine.calibration."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quant.calibrate import HessianAccumulator, QuantArgs, gptq_quantize, rtn_quantize
from quant.calibrate.pipeline import CalibratedLinear, LinearPart, calibrate, relative_output_error


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; a shared 2-core machine
    yield
    torch.set_num_threads(threads)


class ToyBlock(nn.Module):
    """y = x + down(relu(up_gate(x))): a fused [gate; up] linear (two checkpoint parts) and a
    plain one, enough to exercise shared Hessians and block-to-block propagation."""

    def __init__(self, width: int, hidden: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.up_gate = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        with torch.no_grad():
            self.up_gate.weight.copy_(torch.randn(2 * hidden, width, generator=gen) / width ** 0.5)
            self.down.weight.copy_(torch.randn(width, hidden, generator=gen) / hidden ** 0.5)
        self.hidden = hidden

    def forward(self, x):
        gate, up = self.up_gate(x).split(self.hidden, dim=-1)
        return x + self.down(torch.relu(gate) * up)


class ToyTarget:
    """CalibrationTarget over ToyBlocks; 'token ids' index a fixed table of correlated vectors."""

    def __init__(self, blocks: int = 2, width: int = 64, hidden: int = 96):
        gen = torch.Generator().manual_seed(7)
        mixing = torch.randn(width, width, generator=gen) / width ** 0.5 + torch.eye(width)
        self.table = torch.randn(500, width, generator=gen) @ mixing * (torch.rand(width, generator=gen) * 2 + 0.1)
        self.blocks = nn.ModuleList(ToyBlock(width, hidden, seed=i) for i in range(blocks))
        self.num_blocks = blocks
        self.block_inputs: dict[int, list[torch.Tensor]] = {}
        self.width, self.hidden = width, hidden

    def first_block_inputs(self, samples):
        return [self.table[torch.tensor(s)] for s in samples]

    def run_block(self, index, hidden):
        return self.blocks[index](hidden)

    def linears(self, index):
        block = self.blocks[index]
        return [self._linear(block.up_gate, [(f"b{index}.gate", 0), (f"b{index}.up", 1)], self.hidden),
                self._linear(block.down, [(f"b{index}.down", 0)], self.width)]

    @staticmethod
    def _linear(module: nn.Linear, names, rows_each: int) -> CalibratedLinear:
        def set_weight(w):
            with torch.no_grad():
                module.weight.copy_(w)

        parts = [LinearPart(name, slice(i * rows_each, (i + 1) * rows_each)) for name, i in names]
        return CalibratedLinear(module, parts, lambda: module.weight.detach(), set_weight, module.in_features)


def toy_samples(count=8, length=32):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 500, (length,), generator=gen).tolist() for _ in range(count)]


def test_gptq_output_error_beats_rtn_on_every_layer_and_weights_are_written_back():
    target = ToyTarget()
    original = [[p.detach().clone() for p in b.parameters()] for b in target.blocks]
    args = QuantArgs(bits=4, group_size=32, sym=True)
    out = calibrate(target, toy_samples(), args, "gptq", progress=False)

    assert [r.prefix for r in out.reports] == ["b0.gate", "b0.up", "b0.down", "b1.gate", "b1.up", "b1.down"]
    for r in out.reports:
        # same inputs X for both: measured inside the run from this layer's Hessian
        assert r.output_error < 0.8 * r.rtn_output_error, (r.prefix, r.output_error, r.rtn_output_error)
        assert r.gptq_loss > 0
    # the model now holds exactly the dequantized weights, parts stacked in row order
    for i, block in enumerate(target.blocks):
        fused = torch.cat([out.results[f"b{i}.gate"].dequantize(), out.results[f"b{i}.up"].dequantize()])
        assert torch.equal(block.up_gate.weight, fused)
        assert torch.equal(block.down.weight, out.results[f"b{i}.down"].dequantize())
        assert not torch.equal(block.up_gate.weight, original[i][0])


def test_block_inputs_come_from_the_quantized_previous_block():
    """Block 1's Hessian must be built from block 0's output on its *quantized* weights."""
    samples = toy_samples()
    args = QuantArgs(bits=3, group_size=32, sym=False)
    target = ToyTarget()
    out = calibrate(target, samples, args, "gptq", true_sequential=False, progress=False)

    # Redo block 1's first module by hand: inputs from the (now quantized) block 0.
    replay = ToyTarget()  # same seeds: the float model
    with torch.no_grad():
        replay.blocks[0].up_gate.weight.copy_(torch.cat([out.results["b0.gate"].dequantize(),
                                                         out.results["b0.up"].dequantize()]))
        replay.blocks[0].down.weight.copy_(out.results["b0.down"].dequantize())
        h = torch.cat([replay.blocks[0](x) for x in replay.first_block_inputs(samples)])
    acc = HessianAccumulator(h.shape[-1])
    acc.add_batch(h)
    expected = gptq_quantize(replay.blocks[1].up_gate.weight.detach()[: replay.hidden], acc.hessian, args)
    got = out.results["b1.gate"]
    assert torch.equal(got.codes, expected.codes) and torch.allclose(got.scales, expected.scales)


def test_fused_parts_share_one_hessian_and_match_separate_quantization():
    samples = toy_samples()
    args = QuantArgs(bits=4, group_size=16, sym=False, actorder="group")
    target = ToyTarget(blocks=1)
    float_weight = target.blocks[0].up_gate.weight.detach().clone()
    out = calibrate(target, samples, args, "gptq", progress=False)
    acc = HessianAccumulator(target.width)
    acc.add_batch(torch.cat(ToyTarget(blocks=1).first_block_inputs(samples)))
    for name, rows in (("b0.gate", slice(0, 96)), ("b0.up", slice(96, 192))):
        alone = gptq_quantize(float_weight[rows], acc.hessian, args)
        assert torch.equal(out.results[name].codes, alone.codes)
        assert torch.equal(out.results[name].g_idx, alone.g_idx)
        assert not out.results[name].has_trivial_g_idx  # act order "group" permutes groups


def test_true_sequential_calibrates_later_modules_on_quantized_earlier_ones():
    samples = toy_samples()
    args = QuantArgs(bits=3, group_size=32, sym=True)
    sequential = calibrate(ToyTarget(blocks=1), samples, args, "gptq", true_sequential=True, progress=False)
    together = calibrate(ToyTarget(blocks=1), samples, args, "gptq", true_sequential=False, progress=False)
    # first module: same inputs either way; down_proj: different inputs (quantized gate/up before it)
    assert torch.equal(sequential.results["b0.gate"].codes, together.results["b0.gate"].codes)
    assert not torch.equal(sequential.results["b0.down"].codes, together.results["b0.down"].codes)


def test_rtn_without_samples_skip_and_errors():
    target = ToyTarget()
    before = target.blocks[1].down.weight.detach().clone()
    args = QuantArgs(bits=4, group_size=32)
    out = calibrate(target, None, args, "rtn", skip=["b1.down"], progress=False)
    assert out.skipped == ["b1.down"] and "b1.down" not in out.results
    assert torch.equal(target.blocks[1].down.weight, before)  # left in float
    assert torch.equal(out.results["b0.down"].codes, rtn_quantize(ToyTarget().blocks[0].down.weight, args).codes)
    assert all(r.output_error is None for r in out.reports)
    assert "b0.gate" in out.loss_table() and "total" in out.loss_table()

    with pytest.raises(ValueError, match="GPTQ needs calibration samples"):
        calibrate(ToyTarget(), [], args, "gptq", progress=False)
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        calibrate(ToyTarget(), toy_samples(), args, "awq", progress=False)
    with pytest.raises(ValueError, match="group_size 48 does not divide the layer's 64 input columns; the largest "
                                         "group size that divides 64 is 32"):
        calibrate(ToyTarget(), toy_samples(), QuantArgs(bits=4, group_size=48), "gptq", progress=False)


def test_relative_output_error_matches_activations():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 16, generator=gen), torch.randn(8, 16, generator=gen)
    q = w + 0.01 * torch.randn(8, 16, generator=gen)
    acc = HessianAccumulator(16)
    acc.add_batch(x)
    direct = float(((x @ (w - q).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert relative_output_error(w, q, acc.hessian) == pytest.approx(direct, rel=1e-5)


# -- qshard's own model through engine.calibration -------------------------------------------


def test_llama_target_parts_hooks_and_gptq_beats_rtn(tmp_path):
    from engine.calibration import AlreadyQuantizedError, LlamaCalibrationTarget
    from tests.helpers import write_hf_llama

    path = write_hf_llama(tmp_path / "m", hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, vocab=128)
    target = LlamaCalibrationTarget(path, batch_size=3)
    assert target.num_blocks == 2
    modules = target.linears(1)
    assert [[(p.prefix, p.rows.start, p.rows.stop) for p in m.parts] for m in modules] == [
        [("model.layers.1.self_attn.q_proj", 0, 64), ("model.layers.1.self_attn.k_proj", 64, 96),
         ("model.layers.1.self_attn.v_proj", 96, 128)],
        [("model.layers.1.self_attn.o_proj", 0, 64)],
        [("model.layers.1.mlp.gate_proj", 0, 128), ("model.layers.1.mlp.up_proj", 128, 256)],
        [("model.layers.1.mlp.down_proj", 0, 64)]]
    assert [m.in_features for m in modules] == [64, 64, 64, 128]

    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (24, 17, 30, 24, 9)]
    out = calibrate(target, samples, QuantArgs(bits=3, group_size=32, sym=False), "gptq", progress=False)
    assert len(out.results) == 14
    for r in out.reports:
        assert r.output_error <= r.rtn_output_error, r
    mean_ratio = sum(r.output_error / r.rtn_output_error for r in out.reports) / len(out.reports)
    assert mean_ratio < 0.85, mean_ratio

    quantized = tmp_path / "q"
    quantized.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlreadyQuantizedError, match="already quantized \\(quant_method 'gptq'\\)"):
        LlamaCalibrationTarget(quantized)
