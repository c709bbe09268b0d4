"""Compiling a model's modules, and the graph-free fallback for shapes that were not warmed up.

`compile_module` is what `nn.Module.compile` does (the module's calls go through
`torch.compile`), with a backend and a mode from the levers. With `compile_only_warm_sizes`, a
`ShapeGate` stands in front of the compiled call: calls made while warming up compile their
shape and mark it ready; after that, only ready shapes take the compiled path, and any other
shape (an odd size no one configured) runs eager, instead of a job waiting a minute for a new
graph (or, with CUDA graphs, recording one more graph's memory).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ShapeGate", "compile_module", "warming"]

_local = threading.local()


@contextmanager
def warming() -> Iterator[None]:
    """Calls made in this block (this thread) compile their shapes and make them ready."""
    _local.warming = True
    try:
        yield
    finally:
        _local.warming = False


class ShapeGate:
    """Which input shapes a compiled module serves compiled; the others go eager."""

    def __init__(self) -> None:
        self.ready: set[tuple[int, ...]] = set()
        self.compiled_calls = 0
        self.eager_calls = 0
        self._lock = threading.Lock()

    def route(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            key = _shape(args, kwargs)
            warming = getattr(_local, "warming", False)
            if warming or key in self.ready:
                out = compiled(*args, **kwargs)
                with self._lock:
                    self.compiled_calls += 1
                    if warming and key is not None:
                        self.ready.add(key)
                return out
            with self._lock:
                self.eager_calls += 1
            return eager(*args, **kwargs)

        return call


def compile_module(
    module: torch.nn.Module, backend: str, mode: str, gate: ShapeGate | None = None
) -> None:
    """Route `module`'s calls through torch.compile (through `gate`, when given)."""
    options: dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        options["mode"] = mode  # the other backends take no mode
    compiled = torch.compile(module._call_impl, **options)
    if gate is None:
        module._compiled_call_impl = compiled  # what nn.Module.compile sets
    else:
        module._compiled_call_impl = gate.route(compiled, module._call_impl)


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of the first tensor argument (the U-Net's latents, the decoder's `z`)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None
