"""qshard's engine: checkpoints, models, the scheduler and the `LLM` API."""

from engine.llm import LLM, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
