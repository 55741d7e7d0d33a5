"""ONNX Runtime on the CPU execution provider, or the CUDA provider when the device is a GPU.

Runs the graphs of engine.export (from the artefact cache; exported at load only when the
config allows building). On the CPU, tensors cross as numpy arrays without copies; on a GPU they stay
on the device through an IO binding over torch's own buffers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from engine.backends.base import Artefacts
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, UnsupportedSizeError
from engine.export.contracts import CONTRACTS, DECODER_CONTRACTS, DENOISER, TEXT_ENCODER
from engine.export.profiles import ModelDims, outside_profiles
from engine.loading import Components
from engine.types import Decoder

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install 'tiue-serve[onnx]' "
            "(onnxruntime-gpu for the CUDA provider)"
        ) from exc
    return onnxruntime


def _providers(ort: Any, device: torch.device) -> list[Any]:
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise BackendUnavailableError(f"the onnxruntime backend runs on cpu or cuda, not {device.type}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            f"device {device} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime "
            f"{ort.__version__} has only {ort.get_available_providers()}: install onnxruntime-gpu, "
            "or run on device cpu"
        )
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device} was asked for, but torch sees no CUDA GPU")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        _providers(_import_onnxruntime(), torch.device(config.device))

    def __init__(self, components: Components, config: EngineConfig, artefacts: Artefacts | None):
        """`artefacts`: the ONNX graphs to run (engine.export.artefacts decides which)."""
        if artefacts is None:
            raise BackendUnavailableError(
                "the onnxruntime backend runs exported ONNX graphs, and none were given"
            )
        ort = _import_onnxruntime()
        self.device = torch.device(config.device)
        self.precision = config.precision
        self.dtype = config.precision.torch_dtype
        providers = _providers(ort, self.device)
        self.dims = ModelDims.from_components(components)
        started = time.perf_counter()
        self.artefacts = artefacts.folder
        self.profiles = artefacts.profiles
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # constant-folding notes about fp16 on the CPU are noise
        self.contracts = {}
        self.sessions = {}
        for name, path in artefacts.files.items():
            self.contracts[name] = CONTRACTS[name]
            self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        for name, session in self.sessions.items():
            if wanted not in session.get_providers():
                raise BackendUnavailableError(
                    f"onnxruntime could not start {wanted} for {name} (it fell back to {session.get_providers()}); "
                    "check the CUDA and cuDNN libraries onnxruntime-gpu needs"
                )
        log.info(
            "onnxruntime %s on %s with %s from %s in %.1fs",
            ort.__version__,
            self.device,
            wanted,
            artefacts.folder,
            time.perf_counter() - started,
        )

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        return outside_profiles(self.profiles, self.dims.vae_scale, batch, latent_height, latent_width)

    def _check(self, batch: int, height: int, width: int) -> None:
        reason = self.unsupported(batch, height, width)
        if reason:
            raise UnsupportedSizeError(reason)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        if not any(p.batch.contains(batch) for p in self.profiles):
            raise UnsupportedSizeError(f"batch {batch} is outside the compiled batch ranges")
        return self._run(TEXT_ENCODER, {"input_ids": input_ids.to(torch.int64)}, (batch, 1, 1))

    @torch.inference_mode()
    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        dims = (z_t.shape[0], z_t.shape[2], z_t.shape[3])
        self._check(*dims)
        return self._run(DENOISER, {"z_t": z_t.to(self.dtype), "states": states.to(self.dtype)}, dims)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        dims = (latents.shape[0], latents.shape[2], latents.shape[3])
        self._check(*dims)
        return self._run(DECODER_CONTRACTS[decoder], {"latents": latents.to(self.dtype)}, dims)

    def _run(self, name: str, inputs: dict[str, torch.Tensor], dims: tuple[int, int, int]) -> torch.Tensor:
        """One graph on (batch, latent height, latent width) inputs."""
        if self.device.type == "cuda":
            return self._run_bound(name, inputs, dims)
        feeds = {k: v.detach().cpu().contiguous().numpy() for k, v in inputs.items()}
        (out,) = self.sessions[name].run(None, feeds)
        return torch.from_numpy(out)

    def _run_bound(
        self, name: str, inputs: dict[str, torch.Tensor], dims: tuple[int, int, int]
    ) -> torch.Tensor:
        """Run on the GPU over torch-owned buffers: no host round trip for inputs or outputs."""
        contract = self.contracts[name]
        inputs = {k: v.to(self.device).contiguous() for k, v in inputs.items()}
        (out_spec,) = contract.outputs
        out_shape = contract.shapes(self.dims, *dims)[out_spec.name]
        out = torch.empty(out_shape, dtype=out_spec.torch_dtype(self.precision), device=self.device)
        binding = self.sessions[name].io_binding()
        index = self.device.index or 0
        for key, tensor in inputs.items():
            binding.bind_input(
                key, "cuda", index, _NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
            )
        binding.bind_output(
            out_spec.name, "cuda", index, _NUMPY_DTYPES[out.dtype], tuple(out.shape), out.data_ptr()
        )
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.sessions[name].run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out
