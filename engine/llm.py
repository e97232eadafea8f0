"""The offline API: `LLM(model, tensor_parallel_size=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import atexit
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from engine.config import ModelConfig, parse_dtype
from engine.default_model import prepare_default
from engine.devices import resolve_device
from engine.engine import LLMEngine
from engine.engine_config import EngineConfig
from engine.executor import available as available_executors
from engine.executor import executor_class, resolve_name
from engine.prompts import as_prompt_list, check_conversation, check_prompt
from engine.request_output import CompletionOutput, RequestOutput
from engine.sampling import SamplingParams
from engine.weights import checkpoint_files
from kernels.errors import InputError
from parallel.sharding import check_heads
from quant import get_loader

logger = logging.getLogger(__name__)


def resolve_model_path(model: str | Path) -> Path:
    if str(model) == "default":
        return prepare_default()
    return Path(model)


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: str) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    if cfg.quantization_config:
        # packed-weight kernels compute in 16 bits: bf16 is the fast CPU path, fp16 the GPU one
        return torch.bfloat16 if device == "cpu" else torch.float16
    if device == "cuda" and cfg.torch_dtype == torch.float32:
        return torch.bfloat16
    return cfg.torch_dtype


def load_tokenizer(path: Path):
    """The checkpoint's HF tokenizer, or None for a checkpoint without one (token-id prompts only)."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        logger.info("%s has no tokenizer: prompts must be token ids and outputs have no text", path)
        return None
    from transformers import AutoTokenizer  # heavy; only the driver-side API needs it

    return AutoTokenizer.from_pretrained(str(path))


def check_engine_args(**values: Any) -> None:
    """Engine sizes and the seed: positive integers (max_model_len may be None; seed >= 0)."""
    for name, value in values.items():
        if value is None and name == "max_model_len":
            continue
        low = 0 if name == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            want = "an integer >= 0" if low == 0 else "a positive integer"
            raise InputError(f"{name} must be {want}, got {value!r}")


@dataclass
class Plan:
    """What `preflight` resolved: the model directory, its config, the executor, device and dtype."""

    path: Path
    model_config: ModelConfig
    executor: str
    device: str
    dtype: torch.dtype


def preflight(model: str | Path, tensor_parallel_size: int = 1, executor: str = "auto", device: str = "auto",
              dtype: str | torch.dtype = "auto", load_format: str = "auto", **sizes: Any) -> Plan:
    """Everything `LLM` can refuse before any process starts or any weight is read: the sizes,
    executor, config.json, the split, the device, dtype, quantization_config and the checkpoint's
    files. A front end may call it first (it reads only JSON files and safetensors headers' names)."""
    check_engine_args(tensor_parallel_size=tensor_parallel_size, **sizes)
    if load_format not in ("auto", "dummy"):
        raise InputError(f"load_format must be 'auto' or 'dummy' (random weights), got {load_format!r}")
    if executor != "auto" and executor not in available_executors():
        raise InputError(f"unknown executor {executor!r}; available: {', '.join(available_executors())} (or 'auto')")
    path = resolve_model_path(model)
    cfg = ModelConfig.from_dir(path)
    check_heads(cfg.num_attention_heads, cfg.num_key_value_heads, tensor_parallel_size)
    executor_name = resolve_name(executor, tensor_parallel_size)
    if executor_name == "uni" and tensor_parallel_size != 1:
        raise InputError(f"the uni executor runs tensor_parallel_size=1 only, got {tensor_parallel_size}; "
                         f"use executor 'mp' or 'ray'")
    device = resolve_device(device, tensor_parallel_size, executor_name)
    get_loader(cfg.quantization_config)  # parses and validates quantization_config
    if load_format == "auto":
        checkpoint_files(path)
    return Plan(path, cfg, executor_name, device, resolve_dtype(dtype, cfg, device))


class LLM:
    def __init__(self, model: str | Path = "default", tensor_parallel_size: int = 1, executor: str = "auto",
                 dtype: str | torch.dtype = "auto", device: str = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 8192, max_model_len: int | None = None, seed: int = 0,
                 progress: bool = True, dist_timeout_s: float = 120.0, cuda_graphs: bool = True,
                 load_format: str = "auto", kernels: str = "auto", block_size: int = 16,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, async_scheduling: bool | None = None, **executor_options: Any):
        plan = preflight(model, tensor_parallel_size, executor, device, dtype, load_format, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, seed=seed)
        path, cfg = plan.path, plan.model_config
        self.model_config = cfg
        self.config = EngineConfig(
            model_path=str(path), tensor_parallel_size=tensor_parallel_size, dtype=plan.dtype,
            device=plan.device, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings),
            seed=seed, progress=progress, dist_timeout_s=dist_timeout_s, cuda_graphs=cuda_graphs,
            load_format=load_format, kernels=kernels, block_size=block_size, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            async_scheduling=async_scheduling)
        if async_scheduling and plan.executor != "uni":  # before any rank starts
            raise InputError(f"async_scheduling=True needs the uni executor (one in-process rank: the next step "
                             f"reads the last one's tokens on its device), not {plan.executor!r}")
        self.tokenizer = load_tokenizer(path)
        self.executor_name = plan.executor
        self.executor = executor_class(self.executor_name)(self.config, **executor_options)
        self.engine = LLMEngine(self.executor, self.tokenizer, self.config, cfg)
        self._ids = itertools.count()  # request ids of generate() calls
        atexit.register(self.shutdown)

    # -- lifecycle ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if getattr(self, "executor", None) is not None:
            executor, self.executor = self.executor, None
            executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- requests -------------------------------------------------------------------------------

    def _tokenize(self, index: int, prompt) -> tuple[str | None, list[int]]:
        return check_prompt(index, prompt, self.tokenizer, self.model_config.vocab_size, self.config.model_path)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, **kwargs) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise InputError(f"{self.config.model_path} has no tokenizer, so no chat template")
        if not isinstance(messages, (list, tuple)):
            raise InputError(f"chat messages must be a list of {{'role', 'content'}} dicts (or a list of such lists), "
                             f"got {type(messages).__name__}")
        conversations = messages if messages and isinstance(messages[0], (list, tuple)) else [messages]
        for i, conversation in enumerate(conversations):
            check_conversation(i, conversation)
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params, **kwargs)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if self.executor is None:
            raise RuntimeError("this LLM has been shut down")
        # every prompt and parameter set is checked before the first step runs
        prompts = as_prompt_list(prompts)
        if self.executor.is_follower:
            return self._follow(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise InputError(f"sampling parameters {i} are a {type(p).__name__}, not SamplingParams")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            text, ids = self._tokenize(i, prompt)
            if len(ids) >= self.config.max_model_len:
                raise InputError(f"prompt {i} has {len(ids)} tokens; max_model_len={self.config.max_model_len} "
                                 f"leaves no room to generate")
            requests.append((next(self._ids), text, ids, p))
        start = time.perf_counter()
        outputs = self._run(requests, use_tqdm)
        elapsed = time.perf_counter() - start
        self.executor.end_of_call(results_for_followers(outputs))
        generated = sum(len(o.token_ids) for o in outputs)
        logger.info("generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)", generated, len(outputs), elapsed,
                    generated / max(elapsed, 1e-9))
        for o in outputs:
            o.metrics["elapsed_s"] = elapsed
        return outputs

    def _follow(self, prompts) -> list[RequestOutput]:
        outputs = []
        for i, (prompt, completions) in enumerate(zip(prompts, completions_from_results(self.executor.follow()))):
            text, prompt_ids = self._tokenize(i, prompt)
            done = [CompletionOutput(j, self._decode(ids), ids, None) for j, ids in enumerate(completions)]
            outputs.append(RequestOutput(text, prompt_ids, done[0].text, done[0].token_ids, None, outputs=done))
        return outputs

    # -- the loop -------------------------------------------------------------------------------

    def _run(self, requests: list[tuple[int, str | None, list[int], SamplingParams]],
             use_tqdm: bool) -> list[RequestOutput]:
        """Every request through the step engine; the final outputs in the requests' order."""
        final: dict[int, RequestOutput] = {}
        try:
            for request_id, text, ids, p in requests:
                self.engine.add_request(request_id, ids, p, text)
            with tqdm(total=len(requests), desc="generating", disable=not use_tqdm, unit="req") as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            final[out.request_id] = out
                            bar.update(1)
        finally:  # an interrupted call leaves no request behind for the next one
            for request_id, *_ in requests:
                if request_id not in final:
                    self.engine.abort(request_id)
        return [final[request_id] for request_id, *_ in requests]


def results_for_followers(outputs: list[RequestOutput]) -> list[list[int]]:
    """What SPMD followers get when a call ends: per request, [n] then its n completions' token ids."""
    results = []
    for o in outputs:
        results.append([len(o.outputs)])
        results.extend(c.token_ids for c in o.outputs)
    return results


def completions_from_results(results: list[list[int]]) -> list[list[list[int]]]:
    """The inverse of results_for_followers: each request's completions' token ids."""
    requests, i = [], 0
    while i < len(results):
        n = results[i][0]
        requests.append([list(ids) for ids in results[i + 1:i + 1 + n]])
        i += 1 + n
    return requests
