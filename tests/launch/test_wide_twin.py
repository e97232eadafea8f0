"""bench/wide_twin.py: the widened, rotated twin of a Llama computes the same logits (HF
transformers as the oracle), on a tiny random model with the default model's head layout
(3 query heads per KV head, widened to 4; RMSNorm weights away from 1 so folding matters)."""

from __future__ import annotations

import pytest
import torch

from bench.wide_twin import head_rows, widen


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
    return model


def test_head_rows_keep_each_query_head_in_its_kv_group():
    assert head_rows(9, 12, 3) == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_twin_logits_equal_the_originals():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    config = model.config.to_dict()
    state, twin_config = widen(model.state_dict(), config, new_heads=4, seed=3)
    assert twin_config["hidden_size"] == 64 and twin_config["num_attention_heads"] == 4
    assert twin_config["tie_word_embeddings"] is False
    assert twin_config["rms_norm_eps"] == pytest.approx(1e-5 * 48 / 64)
    twin = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in twin_config.items() if k != "dtype"}))
    twin.load_state_dict(state, strict=True)
    twin = twin.to(torch.float64).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, twin(ids).logits
    assert want.abs().max() > 0.1  # a non-trivial model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # float32-stored weights, float64 math
    assert torch.count_nonzero(state["model.layers.0.self_attn.o_proj.weight"][:, 48:]) == 0  # the zero head
