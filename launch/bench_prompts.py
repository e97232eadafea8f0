"""Prompts of mixed lengths for the serving benchmarks (`bench serve`, `bench throughput
--num-prompts`): word windows of the shipped held-out text, cycling through a few lengths from
a sentence to a long passage, at start positions drawn with Python's random.Random(seed) (the
same prompts on any machine)."""

from __future__ import annotations

import random

from launch.texts import DEFAULT_HELDOUT_TEXT, read_text

LENGTHS_WORDS = (8, 24, 64, 160, 400)


def mixed_prompts(count: int, seed: int = 0, lengths: tuple[int, ...] = LENGTHS_WORDS) -> list[str]:
    words = read_text(DEFAULT_HELDOUT_TEXT, "benchmark text").split()
    draw = random.Random(seed)
    prompts = []
    for i in range(count):
        n = min(lengths[i % len(lengths)], len(words))
        start = draw.randrange(len(words) - n + 1)
        prompts.append(" ".join(words[start:start + n]))
    return prompts
