"""What the engine hands back for a request: after each step it advanced (streaming), and at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # all text so far (the final text once finished)
    token_ids: list[int]  # all generated ids so far (a stop token included)
    finish_reason: str | None  # "stop", "length", or None while running
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    request_id: Any = None
    delta: str = ""  # text new since this request's previous output; the deltas concatenate to `text`
    finished: bool = False
