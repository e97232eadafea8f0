"""What torchrun followers learn when rank 0's generate() call ends: every completion of every
request (n > 1 included), through the same int64 encoding the control broadcast carries."""

from __future__ import annotations

from engine.executor.external import _decode_results, _encode_results
from engine.llm import completions_from_results, results_for_followers
from engine.request_output import CompletionOutput, RequestOutput


def test_every_completion_reaches_the_followers():
    outputs = [RequestOutput("a", [1], "x", [5, 6], "length"),
               RequestOutput("b", [2], "y", [7], "stop",
                             outputs=[CompletionOutput(0, "y", [7], "stop"),
                                      CompletionOutput(1, "z", [8, 9, 10], "length"),
                                      CompletionOutput(2, "w", [11], "stop")])]
    sent = _decode_results(_encode_results(results_for_followers(outputs)))
    assert completions_from_results(sent) == [[[5, 6]], [[7], [8, 9, 10], [11]]]
