"""The OpenAI HTTP API's requests (pydantic models: a bad field is a 400 naming it), its error
schema, and the response bodies (plain dicts, built here so that app.py only routes).

Fields OpenAI has and qshard cannot honour (`suffix`, `best_of` > 1, `logit_bias`, tools) are
refused with a 400 naming them rather than ignored; unknown fields are ignored, as vLLM does.
Beyond OpenAI's fields the requests take vLLM's sampling extras: top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, include_stop_str_in_output. `n` completions are
n engine requests (completion i seeded as the engine seeds its own n: engine.sampling.completion_seed).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from engine.sampling import SamplingParams
from kernels.errors import InputError

MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error the server answers with (status and the OpenAI error object)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: StrictInt = Field(1, ge=1, le=64)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = Field(None, ge=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of the first of pydantic's errors: 'top_p: Input should be ...'."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # a union's members add their type names to the path ('prompt.str'): keep the field's path
    loc = [x for x in loc if x not in ("str", "int", "float", "bool")
           and not x.startswith(("list[", "dict[", "function-", "literal[", "tagged-union["))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    if first.get("type") == "missing":
        return f"{param}: a required field is missing", param
    value = first.get("input")
    got = f" (got {value!r:.80})" if value is not None and not isinstance(value, dict) else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{got}", param


# -- sampling parameters -------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
# OpenAI field -> (SamplingParams field, the value that means "off")
_OPTIONAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
    """The engine's parameters for one completion of a request (400 naming a field it refuses)."""
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    values: dict[str, Any] = {"max_tokens": max_tokens, "seed": seed, "ignore_eos": req.ignore_eos,
                              "stop": req.stop, "stop_token_ids": req.stop_token_ids or [], "logprobs": logprobs}
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1), ("min_p", 0.0)):
        value = getattr(req, name)
        values[name] = default if value is None else value
    if req.include_stop_str_in_output:
        if "include_stop_str_in_output" not in _FIELDS:
            raise ApiError(400, "include_stop_str_in_output is not supported by this engine",
                           "include_stop_str_in_output")
        values["include_stop_str_in_output"] = True
    for name, off in _OPTIONAL.items():
        value = getattr(req, name)
        if value is None or value == off:
            continue
        if name not in _FIELDS:
            raise ApiError(400, f"{name} is not supported by this engine", name)
        values[name] = value
    if isinstance(req.stop, list) and any(not s for s in req.stop) or req.stop == "":
        raise ApiError(400, "stop: stop strings must be non-empty", "stop")
    try:
        return SamplingParams(**values)
    except InputError as e:
        text = str(e)
        param = text.split("SamplingParams.", 1)[1].split(" ", 1)[0] if "SamplingParams." in text else None
        raise ApiError(400, text.replace("SamplingParams.", ""), param) from None


# -- responses -----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(request_id: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], offset: int) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, chosen, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, token)
        tokens.append(text)
        chosen.append(entry.get(token))
        tops.append({_token_text(tokenizer, t): lp for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], top: int) -> dict:
    content = []
    for token, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, token)
        others = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": text, "logprob": entry.get(token), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": _token_text(tokenizer, t), "logprob": lp,
                                          "bytes": list(_token_text(tokenizer, t).encode("utf-8"))}
                                         for t, lp in others]})
    return {"content": content}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)
