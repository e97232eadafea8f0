"""Prompt checks: what a request may be, refused with the prompt's index before any step runs.

A prompt is a `str` (tokenized by the checkpoint's tokenizer) or a list/tuple of int token ids.
Refused: an empty string or one that tokenizes to no tokens, text that is not valid Unicode (a
command line's undecodable bytes arrive as lone surrogates), `bytes` (which would otherwise read
as token ids), token ids that are negative, bools or not below the vocabulary size, and anything
else (dict, float, None...). Whitespace-only text is allowed: it is a real prompt of >= 1 token.
Needs only a tokenizer and the vocabulary size, so a front end can check its prompts before the
model loads.
"""

from __future__ import annotations

from typing import Any

from kernels.errors import InputError

_BYTES = (bytes, bytearray, memoryview)


def as_prompt_list(prompts: Any) -> list:
    """`generate`'s argument as a list of prompts: one str or one token-id list is one prompt."""
    if isinstance(prompts, _BYTES):
        raise InputError(f"prompt 0 is {type(prompts).__name__}: decode it to str first "
                         f"(e.g. data.decode('utf-8')); token ids are a list of ints")
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InputError(f"prompts must be a str, a list of token ids, or a list of those; got {type(prompts).__name__}")


def check_text(index: int, prompt: str) -> None:
    """A text prompt that is non-empty and encodable as UTF-8 (no lone surrogates)."""
    if prompt == "":
        raise InputError(f"prompt {index} is empty: give some text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start:e.end].encode("utf-8", "surrogateescape")
        raise InputError(f"prompt {index} is not valid UTF-8 text (undecodable bytes {bad!r} at character "
                         f"{e.start}); pass UTF-8 text") from None


def check_token_ids(index: int, prompt: list | tuple, vocab_size: int) -> list[int]:
    ids = list(prompt)
    if not ids:
        raise InputError(f"prompt {index} is an empty token-id list")
    for pos, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InputError(f"prompt {index}: token {pos} is {t!r}; a token-id prompt must be a non-empty list "
                             f"of ints in [0, {vocab_size})")
    return ids


def check_prompt(index: int, prompt: Any, tokenizer, vocab_size: int, where: str = "the model"
                 ) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one prompt, or InputError naming prompt `index`."""
    if isinstance(prompt, str):
        check_text(index, prompt)
        if tokenizer is None:
            raise InputError(f"{where} has no tokenizer: pass prompts as token-id lists (prompt {index} is text)")
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise InputError(f"prompt {index} ({prompt!r}) tokenizes to no tokens")
        return prompt, check_token_ids(index, ids, vocab_size)
    if isinstance(prompt, _BYTES):
        raise InputError(f"prompt {index} is {type(prompt).__name__}: decode it to str first "
                         f"(e.g. data.decode('utf-8')); token ids are a list of ints")
    if isinstance(prompt, (list, tuple)):
        return None, check_token_ids(index, prompt, vocab_size)
    raise InputError(f"prompt {index} is a {type(prompt).__name__} ({prompt!r:.40}); "
                     f"a prompt is a str or a list of int token ids")


def check_prompts(prompts: Any, tokenizer, vocab_size: int, where: str = "the model"
                  ) -> list[tuple[str | None, list[int]]]:
    return [check_prompt(i, p, tokenizer, vocab_size, where) for i, p in enumerate(as_prompt_list(prompts))]


def check_conversation(index: int, conversation: Any) -> None:
    """A chat conversation: a list of {'role': str, 'content': str} dicts with valid UTF-8 text."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError(f"conversation {index} must be a non-empty list of {{'role', 'content'}} dicts, "
                         f"got {conversation!r:.60}")
    for j, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise InputError(f"conversation {index}, message {j} must be a dict with str 'role' and 'content', "
                             f"got {message!r:.60}")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"conversation {index}, message {j}: content is not valid UTF-8 text") from None
