"""The Ray executor on CPU: same greedy tokens as mp and TP=1, clear start-up errors, and a
killed actor reported by rank within 30 s with every actor process gone."""

from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams
from engine.executor import WorkerFailure
from launch.ray_cluster import RayClusterError
from launch.ray_executor import assign_ranks, node_layout
from tests.launch.conftest import MAX_TOKENS, PROMPTS, free_port, kill_during_generation, sigkill, wait_gone


def test_rank_assignment_keeps_nodes_together_driver_first():
    infos = [{"ip": "10.0.0.2", "node_id": "b", "gpu_ids": ["1"]}, {"ip": "10.0.0.1", "node_id": "a", "gpu_ids": ["3"]},
             {"ip": "10.0.0.2", "node_id": "b", "gpu_ids": ["0"]}, {"ip": "10.0.0.1", "node_id": "a", "gpu_ids": ["2"]}]
    order = assign_ranks(infos, driver_ip="10.0.0.2")
    assert order == [0, 2, 1, 3]  # driver's node first, stable within a node
    layout = node_layout([infos[i] for i in order])
    assert layout == [(0, 2, "0,1"), (1, 2, "0,1"), (0, 2, "2,3"), (1, 2, "2,3")]
    assert node_layout([{"ip": "x", "node_id": "n", "gpu_ids": []}]) == [(0, 1, None)]
    # GPU ids sort numerically, not as text
    assert node_layout([{"ip": "x", "node_id": "n", "gpu_ids": ["10"]},
                        {"ip": "x", "node_id": "n", "gpu_ids": ["9"]}])[0][2] == "9,10"


@pytest.mark.slow
def test_tp3_on_a_local_cluster_equals_mp_and_tp1(model_dir, reference):
    """The executor starts its own loopback cluster (3 logical CPUs) and shuts it down."""
    import ray

    start = time.monotonic()
    with LLM(model_dir, tensor_parallel_size=3, executor="ray", dtype="float32", progress=False,
             ray_num_cpus=3, log_to_driver=False) as llm:
        assert llm.executor_name == "ray"
        pids = llm.executor.rank_pids()
        assert len(set(pids.values())) == 3
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        stats = llm.executor.collect_stats()
    tokens = [o.token_ids for o in outs]
    assert tokens == reference.mp_tokens == reference.tp1_tokens
    assert [o.text for o in outs] == reference.mp_texts
    assert [s["rank"] for s in stats] == [0, 1, 2] and all(s["peak_memory_bytes"] > 0 for s in stats)
    assert not ray.is_initialized()  # the cluster it started is gone
    assert not wait_gone(pids.values(), 10)
    print(f"ray tp=3 round trip {time.monotonic() - start:.1f}s")


def test_more_ranks_than_cpus_is_a_clear_error(model_dir, ray_cluster):
    start = time.monotonic()
    with pytest.raises(RayClusterError, match=r"tensor_parallel_size=9 needs 9 CPUs .* has 4"):
        LLM(model_dir, tensor_parallel_size=9, executor="ray", progress=False, ray_address=ray_cluster.gcs_address)
    assert time.monotonic() - start < 30
    import ray

    assert not ray.is_initialized()


def test_unreachable_cluster_is_a_clear_error(model_dir):
    start = time.monotonic()
    with pytest.raises(RayClusterError, match="not reachable"):
        LLM(model_dir, tensor_parallel_size=3, executor="ray", progress=False, ray_address=f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 15


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim,how", [(2, "process"), (0, "ray.kill")])
def test_killed_actor_is_named_within_30s_and_all_ranks_exit(model_dir, ray_cluster, victim, how):
    import ray

    with LLM(model_dir, tensor_parallel_size=3, executor="ray", dtype="float32", progress=False,
             ray_address=ray_cluster.gcs_address, log_to_driver=False) as llm:
        pids = llm.executor.rank_pids()
        actors = llm.executor.rank_actors()
        kill = (lambda r: sigkill(pids[r])) if how == "process" else (lambda r: ray.kill(actors[r]))
        result = kill_during_generation(llm, victim, kill)
    print(f"\n{how} rank {victim}: {type(result.error).__name__}: {result.error} "
          f"({result.raised_at - result.killed_at:.1f}s after the kill)")
    assert isinstance(result.error, WorkerFailure), result.error
    assert f"rank {victim} " in str(result.error) and result.error.ranks == [victim], str(result.error)
    assert result.raised_at - result.killed_at < 30
    assert not wait_gone(pids.values(), 15), "actor processes still running"
