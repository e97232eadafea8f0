"""`qshard quantize` and `qshard eval-ppl` end to end on a tiny random Llama that uses the default
model's tokenizer: checkpoints that load in qshard (TP=1 and TP=3) and in transformers, exact
asymmetric round trips, perplexity against transformers, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch.cli import main
from tests.helpers import engine_last_logits, write_hf_llama

PROMPTS = [[504, 3458, 314, 260, 1254, 28], [1670, 6744, 282, 3209, 30, 378, 2569, 6326, 11]]


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir):
    """2 layers, hidden 96, 6 heads / 3 KV heads (so TP=3 splits it, as the default model),
    SmolLM2's tokenizer (so the shipped texts work)."""
    path = write_hf_llama(tmp_path_factory.mktemp("tiny") / "float", hidden=96, heads=6, kv_heads=3,
                          intermediate=192, layers=2, vocab=49152, tied=True, init_std=0.05)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, path / f)
    return path


def quantize(model, out, *extra) -> int:
    return main(["--log-level", "WARNING", "quantize", "--model", str(model), "-o", str(out), "--samples", "8",
                 "--seqlen", "64", "--no-progress", *extra])


def greedy(path, tp: int, executor: str) -> list[list[int]]:
    from engine import LLM, SamplingParams

    with LLM(path, tensor_parallel_size=tp, executor=executor, dtype="float32", progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_gptq_checkpoint_loads_and_tp1_equals_tp3(tiny_model, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert quantize(tiny_model, out, "--bits", "4", "--group-size", "32", "--act-order", "group", "--report") == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "err/rtn" in printed  # the per-layer loss table
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == \
        ("gptq", 4, 32, True, "gptq")
    assert qc["desc_act"] is True  # act order "group" wrote a permuted g_idx
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (96 // 8, 96)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied, left in float

    tp1 = greedy(out, 1, "uni")
    assert tp1 == greedy(out, 3, "mp")
    assert all(len(t) == 8 for t in tp1)

    asym = tmp_path / "asym"  # asymmetric GPTQ is written as gptq_v2 (true zero points)
    assert quantize(tiny_model, asym, "--bits", "3", "--group-size", "32", "--asym") == 0
    qc = json.loads((asym / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["sym"], qc["checkpoint_format"], qc["desc_act"]) == (3, False, "gptq_v2", False)
    assert torch.isfinite(engine_last_logits(asym, PROMPTS)).all()


def _make_extreme_groups(path):
    """Layer 0's q_proj: its first 32-column group all >= 0 (asymmetric zero point 0) and the
    others all <= 0 (zero point 2^bits - 1), in every row."""
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    w = tensors[name].clone()
    w[:, :32] = w[:, :32].abs() + 0.01
    w[:, 32:] = -w[:, 32:].abs() - 0.01
    tensors[name] = w
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_asymmetric_round_trip_is_exact(tiny_model, tmp_path, method):
    """save (gptq_v2, true zero points) → load in qshard → dequantize == the calibration result."""
    from engine.calibration import LlamaCalibrationTarget
    from engine.engine_config import EngineConfig
    from engine.worker import Worker
    from kernels.packing import unpack_int32
    from parallel.state import single_process
    from quant.calibrate import QuantArgs
    from quant.calibrate.pipeline import calibrate
    from quant.export import export_quantized
    from quant.gptq.packer import GPTQPacker

    model = tmp_path / "float"
    shutil.copytree(tiny_model, model)
    _make_extreme_groups(model)
    args = QuantArgs(bits=4, group_size=32, sym=False, actorder="weight" if method == "gptq" else "none")
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(10, 20000, (48,), generator=gen).tolist() for _ in range(6)]
    result = calibrate(LlamaCalibrationTarget(model), samples, args, method, progress=False)
    out = export_quantized(model, tmp_path / "q", GPTQPacker(4, 32, sym=False, checkpoint_format="gptq_v2"),
                           lambda prefix, w: result.results[prefix], progress=False)
    q = result.results["model.layers.0.self_attn.q_proj"]
    assert bool((q.zeros[:, 0] == 0).all()) and bool((q.zeros[:, 1:] == 15).all())
    stored = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.qzeros"]
    zeros = unpack_int32(stored, 4, 1, count=96)  # [G, N] true zero points
    assert bool((zeros[0] == 0).all()) and bool((zeros[1:] == 15).all())

    worker = Worker(EngineConfig(str(out), dtype=torch.float32, progress=False), single_process("cpu"))
    for i, layer in enumerate(worker.model.layers):
        loaded = {"self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"], "self_attn.o_proj": ["o_proj"],
                  "mlp.gate_up_proj": ["gate_proj", "up_proj"], "mlp.down_proj": ["down_proj"]}
        for module_name, parts in loaded.items():
            module = layer.get_submodule(module_name)
            group = module_name.split(".")[0]
            expected = []
            for part in parts:
                r = result.results[f"model.layers.{i}.{group}.{part}"]
                g = r.g_idx.long()  # scales are stored in float16
                expected.append((r.codes - r.zeros[:, g]).float() * r.scales.half().float()[:, g])
            assert torch.equal(module.linear.dequantize(), torch.cat(expected)), (i, module_name)


def test_compressed_tensors_output_loads_in_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    assert quantize(tiny_model, out, "--bits", "4", "--group-size", "32", "--format",
                    "compressed-tensors") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True

    ours = engine_last_logits(out, PROMPTS, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in PROMPTS])
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max())), \
        float((ours - theirs).abs().max())
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_eval_ppl_matches_transformers(tiny_model, tmp_path, capsys):
    from launch.cmd_eval_ppl import stride_windows
    from launch.texts import DEFAULT_HELDOUT_TEXT
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_HELDOUT_TEXT.read_text()[:1500])
    assert main(["--log-level", "WARNING", "eval-ppl", "--model", str(tiny_model), "--text", str(text),
                 "--window", "96", "--stride", "40", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("perplexity: ")
    ours = float(lines[-1].split(": ")[1])

    ids = AutoTokenizer.from_pretrained(tiny_model)(text.read_text())["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in stride_windows(len(ids), 96, 40):
            logprobs = model(torch.tensor([ids[w.start:w.stop]])).logits[0].log_softmax(-1)
            for t in range(w.first_scored, w.stop):
                nll -= float(logprobs[t - w.start - 1, ids[t]])
                count += 1
    assert count == len(ids) - 1
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_stride_windows_score_every_token_once():
    from launch.cmd_eval_ppl import stride_windows

    for n, window, stride in [(10, 4, 2), (1000, 128, 37), (5, 8, 4), (2, 2, 1)]:
        scored = [t for w in stride_windows(n, window, stride) for t in range(w.first_scored, w.stop)]
        assert scored == list(range(1, n))
        assert all(w.stop - w.start <= window and w.first_scored > w.start for w in stride_windows(n, window, stride))
    disjoint = stride_windows(1000, 128, 128)  # each window's first token has no context: unscored
    scored = [t for w in disjoint for t in range(w.first_scored, w.stop)]
    assert scored == [t for t in range(1, 1000) if t % 128]
    with pytest.raises(ValueError, match="at least 2"):
        stride_windows(1, 4, 2)


def test_bad_input_gives_clear_errors(tiny_model, tmp_path, capsys):
    def error(*argv) -> str:
        assert quantize(tiny_model, tmp_path / "never", *argv) == 2
        return capsys.readouterr().err

    assert "group_size 40 does not divide the layer's 96 input columns; the largest group size that divides 96 " \
           "is 32" in error("--group-size", "40")
    with pytest.raises(SystemExit):  # argparse: not an integer
        quantize(tiny_model, tmp_path / "never", "--bits", "four")
    assert "bits=5 is not supported; choose one of (2, 3, 4, 8)" in error("--bits", "5", "--group-size", "32")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert f"calibration text file {empty} is empty" in error("--calib", str(empty), "--group-size", "32")
    assert "does not exist" in error("--calib", str(tmp_path / "missing.txt"), "--group-size", "32")
    assert "pack-quantized writes 2/4/8-bit codes, not 3" in error("--bits", "3", "--group-size", "32",
                                                                    "--format", "compressed-tensors")
    assert not (tmp_path / "never").exists()

    rtn = tmp_path / "rtn"
    assert quantize(tiny_model, rtn, "--method", "rtn", "--group-size", "32") == 0
    capsys.readouterr()
    assert quantize(rtn, tmp_path / "again", "--group-size", "32") == 2
    assert "is already quantized (gptq); quantize a float checkpoint" in capsys.readouterr().err


def test_calibration_windows_by_seed():
    from launch.cmd_quantize import calibration_windows
    from launch.texts import calibration_samples

    ids = list(range(5000))
    assert calibration_windows(ids, 16, 64, None) == calibration_samples(ids, 16, 64)  # the default: evenly spaced
    seeded = calibration_windows(ids, 16, 64, 1)
    assert seeded == calibration_windows(ids, 16, 64, 1)  # deterministic
    assert seeded != calibration_windows(ids, 16, 64, 2) and seeded != calibration_samples(ids, 16, 64)
    starts = [w[0] for w in seeded]
    assert starts == sorted(starts) and all(w == list(range(w[0], w[0] + 64)) for w in seeded)
    assert all(0 <= s <= 5000 - 64 for s in starts)
    assert calibration_windows(ids[:64], 3, 64, 7) == [ids[:64]] * 3  # one possible window
    with pytest.raises(ValueError, match="fewer than one sample"):
        calibration_windows(ids[:10], 4, 64, 7)


def test_observer_and_calibration_seed_options(tiny_model, tmp_path, capsys):
    out = {}
    for observer in ("minmax", "mse"):
        out[observer] = tmp_path / observer
        assert quantize(tiny_model, out[observer], "--bits", "4", "--group-size", "32", "--asym",
                        "--observer", observer, "--calib-seed", "3") == 0
        assert f"act-order weight observer {observer} ->" in capsys.readouterr().out  # act order weight: the default
    scales = {o: load_file(p / "model.safetensors")["model.layers.1.mlp.down_proj.scales"].float()
              for o, p in out.items()}
    assert bool((scales["mse"] <= scales["minmax"]).all()) and bool((scales["mse"] < scales["minmax"]).any())
    assert torch.isfinite(engine_last_logits(out["mse"], PROMPTS)).all()
    with pytest.raises(SystemExit):  # argparse: not a choice
        quantize(tiny_model, tmp_path / "never", "--observer", "percentile")


def test_default_group_size_is_128_where_it_divides_else_64_or_32():
    """`qshard quantize` without --group-size works on any model: 128 where it divides every layer's
    in-features, else 64 (SmolLM2-135M: hidden 576), else 32, else per channel."""
    from types import SimpleNamespace

    from launch.cmd_quantize import default_group_size

    def cfg(hidden, inter, heads=8, head_dim=None):
        return SimpleNamespace(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                               head_dim=head_dim or hidden // heads)

    assert default_group_size(cfg(4096, 11008, 32)) == 128  # Llama-2-7B
    assert default_group_size(cfg(576, 1536, 9, 64)) == 64  # SmolLM2-135M
    assert default_group_size(cfg(96, 160)) == 32  # this file's tiny model
    assert default_group_size(cfg(100, 300, 4)) == -1
