"""TensorRT on an NVIDIA GPU: engines from the artefact cache, run over preallocated device buffers.

Each engine gets one execution context per optimization profile, device buffers sized for the
largest shape of any profile and bound by tensor name once, so a call only copies its inputs in,
sets the input shapes and enqueues with ``execute_async_v3`` on the backend's CUDA stream. A shape
seen twice is captured as a CUDA graph and replayed from then on (every address is fixed, so the
graph stays valid). Not thread-safe: one worker thread owns the device, as the service arranges.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import Any

import torch

from engine.backends.base import Artefacts
from engine.backends.tensorrt_runtime import gpu_identity, import_tensorrt, make_logger
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, UnsupportedSizeError
from engine.export.contracts import (
    CONTRACTS,
    DECODER_CONTRACTS,
    DENOISER,
    EXPORT_PRECISIONS,
    TEXT_ENCODER,
    ComponentContract,
)
from engine.export.profiles import ModelDims, outside_profiles
from engine.loading import Components
from engine.types import Decoder

log = logging.getLogger(__name__)

MAX_GRAPHS_PER_ENGINE = 32  # one per distinct (profile, shape); each holds only its launch list

Shape = tuple[int, ...]


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


class _EngineRunner:
    """One deserialized engine: contexts per profile, fixed buffers, lazily captured CUDA graphs."""

    def __init__(
        self,
        trt: ModuleType,
        runtime: Any,
        plan: bytes,
        contract: ComponentContract,
        device: torch.device,
        stream: torch.cuda.Stream,
        cuda_graphs: bool = True,
    ):
        self.contract = contract
        self.device = device
        self.stream = stream
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not load the {contract.name} engine (built for another GPU or TensorRT?); "
                "rebuild it with `tiue build-engines`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        expected = (contract.input_names, contract.output_names)
        if (sorted(self.inputs), sorted(self.outputs)) != tuple(sorted(x) for x in expected):
            raise BackendUnavailableError(
                f"the {contract.name} engine has inputs {self.inputs} and outputs {self.outputs}, "
                f"but the contract says {expected}; rebuild it"
            )
        profiles = range(self.engine.num_optimization_profiles)
        self.ranges = [{n: self.engine.get_tensor_profile_shape(n, i) for n in self.inputs} for i in profiles]
        self.contexts = [self._context(i) for i in profiles]
        self.buffers = self._allocate(trt, names)
        for context in self.contexts:
            for name in names:
                context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple[int, tuple[Shape, ...]], torch.cuda.CUDAGraph] = {}
        self.seen: set[tuple[int, tuple[Shape, ...]]] = set()

    def _context(self, profile: int) -> Any:
        context = self.engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(
                f"TensorRT could not create a context for {self.contract.name} (GPU memory?)"
            )
        context.set_optimization_profile_async(profile, self.stream.cuda_stream)
        return context

    def _allocate(self, trt: ModuleType, names: list[str]) -> dict[str, torch.Tensor]:
        """One flat buffer per tensor, as large as its largest shape under any profile."""
        sizes = dict.fromkeys(names, 0)
        for context, ranges in zip(self.contexts, self.ranges, strict=True):
            for name in self.inputs:
                context.set_input_shape(name, tuple(ranges[name][2]))
            for name in names:
                sizes[name] = max(sizes[name], _numel(tuple(context.get_tensor_shape(name))))
        self.stream.synchronize()
        return {
            name: torch.empty(
                sizes[name], dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=self.device
            )
            for name in names
        }

    def profile_for(self, shapes: dict[str, Shape]) -> int | None:
        for index, ranges in enumerate(self.ranges):
            if all(_within(shapes[n], ranges[n][0], ranges[n][2]) for n in self.inputs):
                return index
        return None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        shapes = {name: tuple(inputs[name].shape) for name in self.inputs}
        profile = self.profile_for(shapes)
        if profile is None:
            raise UnsupportedSizeError(
                f"{self.contract.name}: input shapes {shapes} are outside every engine profile"
            )
        context = self.contexts[profile]
        key = (profile, tuple(shapes[n] for n in self.inputs))
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                self.buffers[name][: _numel(shapes[name])].view(shapes[name]).copy_(inputs[name])
                inputs[name].record_stream(self.stream)
                context.set_input_shape(name, shapes[name])
            (out_name,) = self.outputs
            out_shape = tuple(context.get_tensor_shape(out_name))
            self._execute(context, key)
            result = self.buffers[out_name][: _numel(out_shape)].view(out_shape).clone()
        caller.wait_stream(self.stream)
        result.record_stream(caller)
        return result

    def _execute(self, context: Any, key: tuple[int, tuple[Shape, ...]]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if self.cuda_graphs and key in self.seen and len(self.graphs) < MAX_GRAPHS_PER_ENGINE:
            graph = self._capture(context)
            if graph is not None:
                self.graphs[key] = graph
                graph.replay()
                return
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.contract.name}")
        self.seen.add(key)

    def _capture(self, context: Any) -> torch.cuda.CUDAGraph | None:
        """Capture one enqueue (its shapes already set and run once); None, and no more graphs, if it fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("enqueue failed during capture")
        except RuntimeError as exc:
            log.warning(
                "CUDA graph capture failed for %s, running without graphs: %s", self.contract.name, exc
            )
            self.cuda_graphs = False
            return None
        return graph


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    return n


def _within(shape: Shape, low: Any, high: Any) -> bool:
    return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True))


class TensorRTBackend:
    name = "tensorrt"

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "the tensorrt backend needs an NVIDIA GPU, and torch sees none here; "
                "use --backend onnxruntime or --backend torch on this machine"
            )
        if torch.device(config.device).type != "cuda":
            raise BackendUnavailableError(
                f"the tensorrt backend runs on a CUDA device, not {config.device!r}; pass --device cuda"
            )
        if config.precision not in EXPORT_PRECISIONS:
            raise BackendUnavailableError(
                f"the tensorrt backend runs fp32 or fp16, not {config.precision.value}; pass --precision fp16"
            )

    def __init__(self, components: Components, config: EngineConfig, artefacts: Artefacts | None):
        """`artefacts`: the engines, for this GPU and TensorRT (engine.export.artefacts decides which)."""
        self.check_runnable(config)
        if artefacts is None:
            raise BackendUnavailableError("the tensorrt backend runs built engines, and none were given")
        trt = import_tensorrt()
        self.device = torch.device(config.device)
        self.dtype = config.precision.torch_dtype
        self.dims = ModelDims.from_components(components)
        started = time.perf_counter()
        gpu = gpu_identity(self.device)
        self.artefacts = artefacts.folder
        self.profiles = artefacts.profiles
        torch.cuda.set_device(self.device)
        runtime = trt.Runtime(make_logger(trt))
        self.stream = torch.cuda.Stream(self.device)
        self.runners = {
            name: _EngineRunner(trt, runtime, path.read_bytes(), CONTRACTS[name], self.device, self.stream)
            for name, path in artefacts.files.items()
        }
        log.info(
            "%s %s on %s (%s) from %s in %.1fs",
            trt.__name__,
            trt.__version__,
            gpu[1],
            gpu[0],
            artefacts.folder,
            time.perf_counter() - started,
        )

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        return outside_profiles(self.profiles, self.dims.vae_scale, batch, latent_height, latent_width)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.runners[TEXT_ENCODER]({"input_ids": input_ids.to(self.device, torch.int64)})

    @torch.inference_mode()
    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.runners[DENOISER](
            {"z_t": z_t.to(self.device, self.dtype), "states": states.to(self.device, self.dtype)}
        )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        return self.runners[DECODER_CONTRACTS[decoder]]({"latents": latents.to(self.device, self.dtype)})
