"""Executors by name; out-of-package ones (Ray) come through the `qshard.executors` entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

from engine.engine_config import EngineConfig
from engine.executor.base import Executor, WorkerFailure
from parallel.state import launched_by_torchrun

BUILTIN = {
    "uni": "engine.executor.uni:UniExecutor",
    "mp": "engine.executor.mp:MultiprocExecutor",
    "external": "engine.executor.external:ExternalExecutor",
}


def available() -> list[str]:
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group="qshard.executors")})


def resolve_name(name: str, tensor_parallel_size: int) -> str:
    if name != "auto":
        return name
    if launched_by_torchrun():
        return "external"
    return "uni" if tensor_parallel_size == 1 else "mp"


def executor_class(name: str) -> type[Executor]:
    if name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(":")
        import importlib

        return getattr(importlib.import_module(module), attr)
    for ep in entry_points(group="qshard.executors"):
        if ep.name == name:
            return ep.load()
    raise ValueError(f"unknown executor {name!r}; available: {', '.join(available())} (or 'auto')")


__all__ = ["EngineConfig", "Executor", "WorkerFailure", "available", "executor_class", "resolve_name"]
