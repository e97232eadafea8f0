"""The default model (SmolLM2-135M) RTN-quantized by the test into each weight-only 4-bit format,
group size 64, and run end to end: TP=3 greedy tokens == TP=1 tokens, and logits close to the
same weights run in transformers.

Group 64: K is 576 (hidden) or 1536 (intermediate), whose common divisors are those of 192; 128
divides neither 576 nor, per TP=3 rank, 192. At TP=3 a row-parallel rank gets 192 or 512 columns
(3 or 8 whole groups), and with act-order every rank's columns come from all 9 / 24 groups.

transformers reference: it loads compressed-tensors checkpoints on CPU, so that format is compared
with the checkpoint itself. Its GPTQ and AWQ loaders need gptqmodel (and optimum for GPTQ), not
installable here on CPU, so those formats are compared with their "dequantized twin": transformers'
own float model of the checkpoint's tensors with every quantized weight replaced by the test's
QuantResult.dequantize() (scales rounded to the stored float16), i.e. exactly the weights the
checkpoint encodes, decoded without qshard's loader.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
from safetensors import safe_open

from quant.awq.packer import AWQPacker
from quant.calibrate import QuantArgs, QuantResult, rtn_quantize
from quant.compressed_tensors.packer import CompressedTensorsPacker
from quant.export import export_quantized
from quant.gptq.packer import GPTQPacker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# "The capital of France is", "def fibonacci(n):" in SmolLM2's tokenizer
PROMPTS = [[504, 3575, 282, 4649, 314], [1604, 3987, 46477, 24, 94, 727]]
NEW_TOKENS = 8
GROUP = 64


def act_order_rtn(prefix: str, weight: torch.Tensor, args: QuantArgs) -> QuantResult:
    """RTN with a real act-order permutation: groups are formed over the columns in a random
    order, as GPTQ's actorder "group" forms them in Hessian-diagonal order; codes and g_idx are
    then put back in the original column order, so g_idx is a permutation. The order is one per
    layer INPUT (seeded by it): q/k/v share one Hessian and so one g_idx, as do gate/up."""
    shared_input = re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", prefix))
    gen = torch.Generator().manual_seed(zlib.crc32(shared_input.encode()))
    perm = torch.randperm(weight.shape[1], generator=gen)
    r = rtn_quantize(weight[:, perm], args)
    inverse = torch.argsort(perm)
    return replace(r, codes=r.codes[:, inverse].contiguous(), g_idx=r.g_idx[inverse].contiguous())


def _rtn(args: QuantArgs):
    return lambda prefix, w: rtn_quantize(w, args)


def _formats():
    sym, asym = QuantArgs(bits=4, group_size=GROUP, sym=True), QuantArgs(bits=4, group_size=GROUP, sym=False)
    return {
        "gptq_v1_sym": (GPTQPacker(4, GROUP, sym=True, checkpoint_format="gptq"), _rtn(sym)),
        "gptq_v2_asym_act_order": (GPTQPacker(4, GROUP, sym=False, checkpoint_format="gptq_v2"),
                                   lambda prefix, w: act_order_rtn(prefix, w, asym)),
        "awq": (AWQPacker(GROUP), _rtn(asym)),
        "compressed_tensors_w4a16": (CompressedTensorsPacker(sym), _rtn(sym)),
    }


FORMATS = list(_formats())


@dataclass
class Run:
    """What one format's checkpoint did: qshard at TP=1 and TP=3, and transformers."""
    config: dict
    act_order_layers: int
    tokens_tp1: list[list[int]]
    tokens_tp3: list[list[int]]
    logprobs_tp1: torch.Tensor  # [prompts, NEW_TOKENS]: log p(chosen token) at each step
    logprobs_tp3: torch.Tensor
    logits_tp1: torch.Tensor  # [prompts, vocab]: last prompt position
    hf_logits: torch.Tensor
    hf_logprobs: torch.Tensor  # transformers' log p of qshard's tokens, teacher-forced
    hf_argmax: list[list[int]]  # transformers' greedy choice at each generated position
    float_logits: torch.Tensor


def _generate(path, tp: int):
    """Greedy tokens and chosen-token logprobs; at TP=1 also the last-prompt-position logits,
    from the same in-process worker (saves a second load of the model)."""
    from engine import LLM, SamplingParams

    with LLM(path, tensor_parallel_size=tp, executor="uni" if tp == 1 else "mp", dtype="float32",
             progress=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                                                    logprobs=0))
        logits = _worker_last_logits(llm.executor.worker) if tp == 1 else None
    tokens = [o.token_ids for o in outs]
    logprobs = torch.tensor([[lp[t] for t, lp in zip(o.token_ids, o.logprobs)] for o in outs])
    return tokens, logprobs, logits


def _worker_last_logits(worker) -> torch.Tensor:
    """Last-position logits of PROMPTS through a TP=1 worker (as tests.helpers.engine_last_logits)."""
    from engine.batch import ForwardBatch

    batch = ForwardBatch.build(PROMPTS, [0] * len(PROMPTS), list(range(len(PROMPTS))), worker.ctx.device)
    with torch.inference_mode():
        worker.cache.reserve(len(PROMPTS), max(len(p) for p in PROMPTS))
        return worker.model.compute_logits(worker.model(batch, worker.cache)).float().cpu()


def _hf_run(model, tokens: list[list[int]]):
    """transformers' last-prompt logits, log p of each of qshard's tokens, and its own argmax."""
    logits, logprobs, argmax = [], [], []
    with torch.no_grad():
        for prompt, generated in zip(PROMPTS, tokens):
            seq = torch.tensor([prompt + generated])
            out = model(seq).logits[0].float()
            steps = out[len(prompt) - 1: len(prompt) - 1 + len(generated)]  # predicts each generated token
            logits.append(out[len(prompt) - 1])
            logprobs.append(steps.log_softmax(-1).gather(1, torch.tensor(generated)[:, None])[:, 0])
            argmax.append(steps.argmax(-1).tolist())
    return torch.stack(logits), torch.stack(logprobs), argmax


@pytest.fixture(scope="module")
def hf_float(default_model_dir):
    """transformers' float32 default model, and its last-prompt logits (the unquantized baseline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        float_logits = torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in PROMPTS])
    return model, float_logits


def _load_twin(model, path, results: dict[str, QuantResult]) -> None:
    """Give transformers' model the checkpoint's tensors, quantized ones as their exact dequantization."""
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.rsplit(".", 1)[0] not in results:
                state[name] = f.get_tensor(name).float()
    for prefix, r in results.items():
        state[f"{prefix}.weight"] = replace(r, scales=r.scales.half().float()).dequantize()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)


@pytest.fixture(scope="module", params=FORMATS)
def run(request, default_model_dir, hf_float, tmp_path_factory) -> tuple[str, Run]:
    fmt = request.param
    packer, quantize = _formats()[fmt]
    results: dict[str, QuantResult] = {}

    def recording(prefix, w):
        results[prefix] = quantize(prefix, w)
        return results[prefix]

    path = export_quantized(default_model_dir, tmp_path_factory.mktemp(fmt) / "ckpt", packer, recording,
                            progress=False)
    tokens1, logprobs1, logits1 = _generate(path, 1)
    tokens3, logprobs3, _ = _generate(path, 3)
    if fmt.startswith("compressed_tensors"):  # the checkpoint itself, loaded by transformers
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:  # the dequantized twin (see the module docstring)
        hf_model, _ = hf_float
        _load_twin(hf_model, path, results)
    hf_logits, hf_logprobs, hf_argmax = _hf_run(hf_model, tokens1)
    act_order = sum(not r.has_trivial_g_idx for r in results.values())
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return fmt, Run(config, act_order, tokens1, tokens3, logprobs1, logprobs3, logits1, hf_logits, hf_logprobs,
                    hf_argmax, hf_float[1])


def test_checkpoint_is_the_format_asked_for(run):
    fmt, r = run
    c = r.config
    want = {"gptq_v1_sym": ("gptq", "gptq", True, False), "gptq_v2_asym_act_order": ("gptq", "gptq_v2", False, True)}
    if fmt in want:
        assert (c["quant_method"], c["checkpoint_format"], c["sym"], c["desc_act"]) == want[fmt]
        assert (c["bits"], c["group_size"]) == (4, GROUP)
    elif fmt == "awq":
        assert (c["quant_method"], c["bits"], c["group_size"], c["zero_point"]) == ("awq", 4, GROUP, True)
    else:
        w = c["config_groups"]["group_0"]["weights"]
        assert (c["quant_method"], c["format"]) == ("compressed-tensors", "pack-quantized")
        assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"]) == (4, GROUP, "group", True)
    # act-order: every one of the 210 decoder linears has a permuted g_idx; otherwise none
    assert r.act_order_layers == (210 if fmt == "gptq_v2_asym_act_order" else 0)


def test_tp3_tokens_equal_tp1(run):
    fmt, r = run
    assert r.tokens_tp3 == r.tokens_tp1
    assert all(len(t) == NEW_TOKENS for t in r.tokens_tp1)
    diff = (r.logprobs_tp3 - r.logprobs_tp1).abs().max().item()
    print(f"{fmt}: TP=3 vs TP=1 max |logprob diff| of the chosen tokens {diff:.2e}")
    assert diff < 1e-3  # measured <= 6.7e-6 (float32; row-parallel partial sums added in another order)


def test_logits_close_to_transformers(run):
    fmt, r = run
    logit_diff = (r.logits_tp1 - r.hf_logits).abs().max().item()
    logprob_diff = (r.logprobs_tp1 - r.hf_logprobs).abs().max().item()
    quant_shift = (r.logits_tp1 - r.float_logits).abs().max().item()
    print(f"{fmt}: vs transformers max |logit diff| {logit_diff:.2e} (logits up to {r.hf_logits.abs().max():.1f}), "
          f"max |logprob diff| over {NEW_TOKENS} steps {logprob_diff:.2e}; quantization moved logits by up to "
          f"{quant_shift:.2f}")
    # Measured on CPU, float32, one thread: max |logit diff| 0.0 for all four formats (qshard's
    # prefill with the dequantized weights is bit-identical to transformers'; so is the float
    # model's), max |logprob diff| over the 8 decode steps 5.1e-6 .. 6.0e-6 (KV-cache decode vs
    # transformers' full forward). Quantization moved the logits by 12.3 (gptq v1 sym, and
    # compressed-tensors: the same RTN codes), 18.2 (gptq v2 asym act-order), 14.9 (awq).
    assert logit_diff < 1e-3 and logprob_diff < 1e-3
    assert quant_shift > 1000 * logit_diff  # both sides really run the quantized weights
    assert r.hf_argmax == r.tokens_tp1  # transformers' greedy picks = qshard's, at every step
