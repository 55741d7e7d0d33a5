"""CUDA graphs around a static-shape callable (a loaded AOTInductor package): captured on its first call,
replayed after, on the thread that calls it (the device thread).

The captured graph reads its inputs from, and writes its output to, buffers it owns: a call copies the
inputs in and returns the output buffer, which the next replay overwrites (the pipeline consumes each
stage's output before the next batch; the prompt cache copies what it keeps). All graphs of a backend
share one memory pool, as the stages replay one after another on one stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

TensorFn = Callable[..., torch.Tensor]


class GraphedCallable:
    """`fn` (static shapes) replayed from a CUDA graph; a failed capture leaves it running `fn` itself."""

    def __init__(self, fn: TensorFn, name: str, pool: Any):
        self.fn = fn
        self.name = name
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.output: torch.Tensor | None = None
        self.failed = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.failed:
            return self._capture(args)
        if self.graph is None:
            return self.fn(*args)
        for static, given in zip(self.inputs, args, strict=True):
            static.copy_(given)
        self.graph.replay()
        assert self.output is not None
        return self.output

    def _capture(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run `fn` on a side stream first (lazy initialisation, cuBLAS workspaces stay out of the graph),
        then record one call on buffers of our own."""
        self.inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.output = self.fn(*self.inputs)
        except RuntimeError as exc:
            self.failed, self.inputs, self.output = True, (), None
            log.warning("CUDA graph capture of %s failed, running it without one: %s", self.name, exc)
            return self.fn(*args)
        self.graph = graph
        graph.replay()
        return self.output
