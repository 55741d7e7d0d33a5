"""Contracts, profiles, the exported graphs themselves, the CLI, and how the ONNX Runtime backend
treats missing, stale and fp16 artefacts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch

from engine.backends.torch_backend import TorchBackend
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, UnsupportedSchedulerError
from engine.export.cache import ArtefactStore
from engine.export.contracts import CONTRACTS, DENOISER, TEXT_ENCODER, VAE_DECODER
from engine.export.profiles import ModelDims, Profile, Range, default_profiles, profiles_from_specs
from engine.loading import load_components
from engine.pipeline import load_pipeline
from engine.schedule import DDIMChain
from engine.types import Precision

Cli = Callable[..., int]
Config = Callable[..., EngineConfig]

SD_DIMS = ModelDims(
    seq_len=77, hidden=1024, latent_channels=4, vae_scale=8, latent_multiple=8, default_latent=64
)


# -- profiles and contracts ------------------------------------------------------------------------


def test_default_profile_for_sd_is_256_to_768_px() -> None:
    (profile,) = default_profiles(SD_DIMS, 8)
    assert profile == Profile(Range(1, 4, 8), Range(32, 64, 96), Range(32, 64, 96))


def test_size_specs_are_pixels_width_first() -> None:
    profiles = profiles_from_specs(["256:512:768", "512x256:512:1024"], Range.parse("1:2:4"), SD_DIMS, 4)
    assert profiles[0].height == profiles[0].width == Range(32, 64, 96)
    assert profiles[1].width == Range(64, 64, 64) and profiles[1].height == Range(32, 64, 128)
    assert all(p.batch == Range(1, 2, 4) for p in profiles)
    with pytest.raises(ValueError, match="multiples of 64 px"):
        profiles_from_specs(["500"], None, SD_DIMS, 4)
    with pytest.raises(ValueError):
        Range.parse("8:4:1")


def test_contracts_declare_names_axes_and_profile_shapes() -> None:
    denoiser = CONTRACTS[DENOISER]
    assert denoiser.input_names == ["z_t", "states"] and denoiser.output_names == ["z_0"]
    assert denoiser.dynamic_axes() == {
        "z_t": {0: "batch", 2: "height", 3: "width"},
        "states": {0: "batch"},
        "z_0": {0: "batch", 2: "height", 3: "width"},
    }
    profile = Profile(Range(1, 4, 8), Range(32, 64, 96), Range(32, 64, 128))
    assert denoiser.profile_shapes(SD_DIMS, profile) == {
        "z_t": ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 96, 128)),
        "states": ((1, 77, 1024), (4, 77, 1024), (8, 77, 1024)),
    }
    assert CONTRACTS[VAE_DECODER].shapes(SD_DIMS, 2, 64, 96)["images"] == (2, 3, 512, 768)
    text = CONTRACTS[TEXT_ENCODER]
    assert len(text.distinct_profiles((profile, dataclasses.replace(profile, width=Range(64, 64, 64))))) == 1


def test_sample_inputs_avoid_batch_one_and_square_sizes() -> None:
    profile = Profile(Range(1, 4, 8), Range(32, 64, 96), Range(32, 64, 96))
    z_t, states = CONTRACTS[DENOISER].sample_inputs(SD_DIMS, profile, Precision.FP16, torch.device("cpu"))
    assert z_t.shape[0] == states.shape[0] == 2 and z_t.shape[2] != z_t.shape[3]
    assert z_t.dtype == torch.float16


def test_a_nonlinear_scheduler_is_refused(tiny_model_dir: Path) -> None:
    components = load_components(tiny_model_dir, torch.float32, "cpu", 4)
    config = {**components.scheduler_config, "clip_sample": True}
    nonlinear = dataclasses.replace(components, chain=DDIMChain.from_scheduler_config(config, 4))
    with pytest.raises(UnsupportedSchedulerError, match="exporting the TiUE denoiser"):
        CONTRACTS[DENOISER].build_module(nonlinear, Precision.FP32)


# -- the exported graphs ---------------------------------------------------------------------------


def _entry_files(engine_dir: Path) -> dict[str, Path]:
    (entry,) = ArtefactStore(engine_dir).entries("onnx")
    return {name: entry.file(name) for name in entry.files if not name.endswith(".data")}


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_the_denoiser_is_one_graph_with_dynamic_batch_and_size(engine_dir_any: Path) -> None:
    model = onnx.load(str(_entry_files(engine_dir_any)[DENOISER]))
    inputs = {i.name: _dims(i) for i in model.graph.input}
    assert inputs == {"z_t": ["batch", 4, "height", "width"], "states": ["batch", 77, 32]}
    assert [(o.name, _dims(o)) for o in model.graph.output] == [("z_0", ["batch", 4, "height", "width"])]
    assert model.opset_import[0].version == 18
    assert not {n.op_type for n in model.graph.node} & {"Loop", "If", "Scan"}, "no control flow inside"


def test_the_manifest_records_what_the_graphs_depend_on(engine_dir_any: Path) -> None:
    (entry,) = ArtefactStore(engine_dir_any).entries("onnx")
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["key"]["exporter"] == "torchscript-opset18"
    assert manifest["key"]["libraries"] == {"torch": torch.__version__.split("+")[0]}
    assert manifest["key"]["profiles"] == [{"batch": [1, 2, 4], "height": [4, 8, 12], "width": [4, 8, 12]}]
    assert manifest["info"]["dims"]["vae_scale"] == 8


def test_exporting_the_same_key_again_reuses_the_entry(
    tiny_model_dir_any: Path, engine_dir_any: Path, tiue: Cli, export_args: list[str]
) -> None:
    before = {e.path: e.path.stat().st_mtime_ns for e in ArtefactStore(engine_dir_any).entries()}
    args = ("--model", tiny_model_dir_any, "--engine-dir", engine_dir_any, "--backend", "onnxruntime")
    assert tiue("build-engines", *args, "--precision", "fp32", "--device", "cpu", *export_args) == 0
    assert {e.path: e.path.stat().st_mtime_ns for e in ArtefactStore(engine_dir_any).entries()} == before


def test_cli_rejects_sizes_the_unet_cannot_take(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiue: Cli
) -> None:
    assert tiue("export", "--model", tiny_model_dir, "--out", tmp_path, "--sizes", "40:64:96") == 2
    assert "multiples of 16 px" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tiue("export", "--out", tmp_path, "--batch", "4:2:1")


# -- the backend and the cache ----------------------------------------------------------------------


def test_build_engines_without_batch_builds_for_the_max_batch_size_the_server_runs(
    tiny_model_dir: Path, tmp_path: Path, tiue: Cli, ort_config: Config
) -> None:
    """`--batch` defaults to 1:4:max-batch-size (its help says so), so the same settings as `tiue serve`
    build the profile the server looks for; it was 1:4:8 whatever the setting, which a server with
    batches of 16 refused."""
    args = (
        "--model",
        tiny_model_dir,
        "--engine-dir",
        tmp_path,
        "--backend",
        "onnxruntime",
        "--device",
        "cpu",
    )
    assert tiue("build-engines", *args, "--sizes", "32:64:96", "--max-batch-size", "16") == 0
    (entry,) = ArtefactStore(tmp_path).entries("onnx")
    assert json.loads((entry.path / "manifest.json").read_text())["key"]["profiles"][0]["batch"] == [1, 4, 16]
    config = dataclasses.replace(ort_config(tiny_model_dir, tmp_path), max_batch_size=16)  # build_engines off
    pipeline = load_pipeline(config)
    assert pipeline.backend.artefacts == entry.path  # type: ignore[attr-defined]


def test_missing_artefacts_fail_clearly_without_building(
    tiny_model_dir: Path, tmp_path: Path, ort_config: Config
) -> None:
    with pytest.raises(BackendUnavailableError, match="there are none.*tiue export --model"):
        load_pipeline(ort_config(tiny_model_dir, tmp_path))
    assert not any(tmp_path.iterdir()), "nothing is exported unless build_engines is set"


def test_stale_graphs_are_named_then_rebuilt_when_allowed(
    tiny_model_dir: Path, fp16_engine_dir: Path, tmp_path: Path, ort_config: Config
) -> None:
    engines = shutil.copytree(fp16_engine_dir, tmp_path / "engines")
    (entry,) = ArtefactStore(engines).entries("onnx")
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["key"]["libraries"]["torch"] = "2.0.0"
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailableError) as info:
        load_pipeline(ort_config(tiny_model_dir, engines, precision=Precision.FP16))
    assert "torch 2.0.0 (want" in str(info.value) and "(want fp" not in str(info.value)
    with pytest.raises(BackendUnavailableError, match=r"precision fp16 \(want fp32\)"):
        load_pipeline(ort_config(tiny_model_dir, engines))
    pipeline = load_pipeline(ort_config(tiny_model_dir, engines, build_engines=True))
    assert pipeline.backend.artefacts != entry.path  # type: ignore[attr-defined]
    assert len(ArtefactStore(engines).entries("onnx")) == 2


def test_a_changed_model_does_not_load_old_graphs(
    tiny_model_dir: Path, engine_dir_any: Path, tmp_path: Path, ort_config: Config
) -> None:
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    engines = shutil.copytree(engine_dir_any, tmp_path / "engines")
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "_edited": True}))
    with pytest.raises(BackendUnavailableError, match="model content"):
        load_pipeline(ort_config(model, engines))


def test_fp16_graphs_run_in_fp16(tiny_model_dir: Path, fp16_engine_dir: Path, ort_config: Config) -> None:
    pipeline = load_pipeline(ort_config(tiny_model_dir, fp16_engine_dir, precision=Precision.FP16))
    files = _entry_files(fp16_engine_dir)
    model = onnx.load(str(files[DENOISER]))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT16}
    reference = TorchBackend(pipeline.components, EngineConfig(precision=Precision.FP16))
    ids = pipeline.tokenize(["a red circle", "a tree", "a cat"])
    states = pipeline.backend.encode_text(ids)
    assert states.dtype == torch.float16
    z_t = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    got, want = pipeline.backend.denoise(z_t, states), reference.denoise(z_t, states)
    assert got.dtype == torch.float16 and float((got.float() - want.float()).abs().max()) < 0.05


def test_graphs_over_two_gigabytes_keep_their_weights_in_one_file(tmp_path: Path) -> None:
    """The exporter writes one file per weight past protobuf's limit; they are gathered into one."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from engine.export.onnx_export import _consolidate_external_data

    weights = [numpy_helper.from_array(np.full((1024,), i, np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("Add", ["x", "w0"], ["a"]), helper.make_node("Add", ["a", "w1"], ["b"])]
    nodes.append(helper.make_node("Add", ["b", "w2"], ["y"]))
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1024]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], weights))
    path = tmp_path / "denoiser.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    assert len(list(tmp_path.iterdir())) == 4
    _consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoiser.onnx", "denoiser.onnx.data"]
    (y,) = ort.InferenceSession(str(path)).run(None, {"x": np.zeros(1024, np.float32)})
    assert y.tolist() == [3.0] * 1024
