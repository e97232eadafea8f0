"""The mp executor: a follower killed mid-generation is named within 30 s and every rank exits."""

from __future__ import annotations

import pytest

from engine import LLM
from engine.executor import WorkerFailure
from tests.launch.conftest import kill_during_generation, sigkill, wait_gone


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_follower_is_named_within_30s_and_all_ranks_exit(model_dir):
    with LLM(model_dir, tensor_parallel_size=3, executor="mp", dtype="float32", progress=False) as llm:
        pids = llm.executor.rank_pids()
        result = kill_during_generation(llm, 1, lambda r: sigkill(pids[r]))
        print(f"\n{type(result.error).__name__}: {result.error} ({result.raised_at - result.killed_at:.1f}s after the kill)")
        assert isinstance(result.error, WorkerFailure), result.error
        assert "rank 1 " in str(result.error) and result.error.ranks == [1], str(result.error)
        assert result.raised_at - result.killed_at < 30
        followers = [pid for rank, pid in pids.items() if rank != 0]
        assert not wait_gone(followers, 10), "follower processes still running"
        with pytest.raises(WorkerFailure, match="earlier failure"):
            llm.generate("again")
