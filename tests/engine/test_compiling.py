"""torch.compile for serving (engine.compiling): buckets, padding, no compile after warm-up, the cache.

The pipeline tests compile with dynamo's `eager` backend: guards, recompiles and the set_stance switch
are dynamo's and the same whatever the backend, and inductor on this CPU takes minutes for the tiny
UNet (286 s for 4 graphs, measured). The cache tests run inductor for real, on a small module, in two
processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

from engine import EngineConfig, GenerationRequest, compiling
from engine.errors import BackendUnavailableError
from engine.pipeline import TiUEPipeline, load_pipeline, to_uint8
from engine.types import BackendName, TorchCompile

ROOT = Path(__file__).resolve().parents[2]


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _req(seed: int, size: int = 64) -> GenerationRequest:
    return GenerationRequest(f"a red circle {seed}", seed, size, size)


def test_config_buckets_and_the_old_boolean() -> None:
    assert EngineConfig(torch_compile=True).torch_compile is TorchCompile.DEFAULT  # type: ignore[arg-type]
    assert EngineConfig(torch_compile=False).torch_compile is TorchCompile.OFF  # type: ignore[arg-type]
    assert EngineConfig(torch_compile=TorchCompile.OFF).batch_buckets() == ()
    on = TorchCompile.DEFAULT
    assert EngineConfig(torch_compile=on, max_batch_size=8).batch_buckets() == (1, 2, 4, 8)
    assert EngineConfig(torch_compile=on, max_batch_size=6).batch_buckets() == (1, 2, 4, 6)
    assert EngineConfig(torch_compile=on, max_batch_size=8, warm_batch_sizes=(3,)).batch_buckets() == (3, 8)
    assert EngineConfig(torch_compile=on, backend=BackendName.ONNXRUNTIME).batch_buckets() == ()
    with pytest.raises(ValueError, match="outside 1..max_batch_size"):
        EngineConfig(torch_compile=on, max_batch_size=4, warm_batch_sizes=(8,)).batch_buckets()


def test_auto_is_cuda_graphs_on_cuda_and_off_on_the_cpu() -> None:
    """The default: what each device serves fastest; explicit modes keep their meaning everywhere."""
    assert EngineConfig().torch_compile is TorchCompile.AUTO
    assert EngineConfig().compile_mode is TorchCompile.OFF and not EngineConfig().compiles
    assert EngineConfig().batch_buckets() == ()
    cuda = EngineConfig(device="cuda:1", max_batch_size=16)
    assert cuda.compile_mode is TorchCompile.REDUCE_OVERHEAD and cuda.compiles
    for mode in (TorchCompile.OFF, TorchCompile.DEFAULT, TorchCompile.AOT):
        assert EngineConfig(device="cuda", torch_compile=mode).compile_mode is mode
        assert EngineConfig(torch_compile=mode).compile_mode is mode


def test_gpu_buckets_are_powers_of_two_up_to_16_and_the_maximum() -> None:
    def buckets(device: str, top: int) -> tuple[int, ...]:
        return EngineConfig(
            device=device, torch_compile=TorchCompile.DEFAULT, max_batch_size=top
        ).batch_buckets()

    assert buckets("cuda", 16) == (1, 2, 4, 8, 16)
    assert buckets("cuda", 6) == (1, 2, 4, 6)
    assert buckets("cuda", 64) == (1, 2, 4, 8, 16, 64)
    assert buckets("cpu", 64) == (1, 2, 4, 8, 16, 32, 64)  # as before
    cuda = EngineConfig(device="cuda", max_batch_size=64, warm_batch_sizes=(3,))
    assert cuda.batch_buckets() == (3, 64)


def test_cuda_graphs_are_refused_on_the_cpu(tiny_model_dir: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="needs device cuda"):
        load_pipeline(EngineConfig(tiny_model_dir, torch_compile=TorchCompile.REDUCE_OVERHEAD))


@pytest.fixture(scope="module")
def compiled(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TiUEPipeline:
    """Buckets 1 and 4 at 64 px, compiled (dynamo, `eager` backend) and warmed."""
    real = compiling.compile_module
    compiling.compile_module = lambda m, mode: torch.compile(m, backend="eager", dynamic=False)  # type: ignore[assignment,return-value]
    try:
        torch._dynamo.reset()
        config = EngineConfig(
            tiny_model_dir,
            torch_compile=TorchCompile.DEFAULT,
            compile_cache_dir=tmp_path_factory.mktemp("compile-cache"),
            max_batch_size=4,
            warm_batch_sizes=(1,),
        )
        pipe = load_pipeline(config)
    finally:
        compiling.compile_module = real  # type: ignore[assignment]
    before = _graphs()
    pipe.warmup()
    pipe.warmed_graphs = _graphs() - before  # type: ignore[attr-defined]
    return pipe


@pytest.fixture(scope="module")
def eager(tiny_model_dir: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(tiny_model_dir, max_batch_size=4))


@pytest.mark.slow  # compiles every bucket (~10 s)
def test_warmup_compiles_each_bucket_and_nothing_after(compiled: TiUEPipeline) -> None:
    assert compiled.config.batch_buckets() == (1, 4)
    assert compiled.warmed_graphs == 6  # type: ignore[attr-defined]  # text encoder, denoiser, decoder at 1 and 4
    before = _graphs()
    for batch in (1, 2, 3, 4, 1):
        compiled.generate([_req(s) for s in range(batch)])
    compiled.generate([_req(s, size=32) for s in range(2)])  # a size never warmed: eager, not compiled
    assert _graphs() == before


def test_padded_batches_give_the_unpadded_images(compiled: TiUEPipeline, eager: TiUEPipeline) -> None:
    requests = [_req(s) for s in (5, 6, 7)]  # padded to the bucket of 4
    got = compiled.generate(requests).images
    want = eager.generate(requests).images
    assert [im.seed for im in got] == [5, 6, 7]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g.pixels.astype(int) - w.pixels.astype(int)).max() <= 1


def test_an_unwarmed_size_runs_eagerly_and_right(compiled: TiUEPipeline, eager: TiUEPipeline) -> None:
    requests = [_req(s, size=48) for s in (1, 2)]
    got, want = compiled.generate(requests).images, eager.generate(requests).images
    for g, w in zip(got, want, strict=True):
        assert np.abs(g.pixels.astype(int) - w.pixels.astype(int)).max() <= 1


def test_warmup_covers_warm_sizes_and_explicit_shapes(tiny_model_dir: Path) -> None:
    pipe = load_pipeline(EngineConfig(tiny_model_dir, max_batch_size=4, warm_sizes=((32, 32), (64, 32))))
    seen: list[tuple[int, int, int]] = []
    real = pipe._run

    def spy(requests: list[GenerationRequest]) -> object:
        seen.append((len(requests), *requests[0].shape_key))
        return real(requests)

    pipe._run = spy  # type: ignore[method-assign,assignment]
    pipe.warmup()  # eager: one image per warm size
    assert seen == [(1, 32, 32), (1, 64, 32)]
    seen.clear()
    pipe.warmup(batch_sizes=(2, 3), sizes=((48, 48),))
    assert seen == [(2, 48, 48), (3, 48, 48)]


def test_uint8_images_round_as_numpy_did() -> None:
    """to_uint8 now converts where the images are (1 byte a value back from a GPU); same values."""
    images = torch.rand(2, 3, 8, 8) * 2.2 - 1.1
    images[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255 - 1, 3 / 255 - 1])  # .5 boundaries after scaling
    old = (((images / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(to_uint8(images), old)


# -- the compile cache: real inductor, a small module, two processes ---------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from engine import compiling
    from engine.config import EngineConfig
    from engine.types import TorchCompile

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = EngineConfig(torch_compile=TorchCompile.DEFAULT, compile_cache_dir=Path(sys.argv[1]), max_batch_size=2)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    started = time.perf_counter()
    compiling.prepare(config)
    compiled = compiling.compile_module(model.eval(), config.torch_compile)
    with torch.inference_mode():
        for batch in config.batch_buckets():
            out = compiled(torch.randn(batch, 4, 16, 16))
    compiling.save(config)
    print(f"{time.perf_counter() - started:.3f} {out.abs().sum().item():.6f}")
    """
)


def _warm_in_a_process(cache: Path) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cache.parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, checksum = done.stdout.split()[-2:]
    return float(seconds), float(checksum)


@pytest.mark.slow
def test_a_second_process_warms_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "compile"
    cold, cold_sum = _warm_in_a_process(cache)
    assert any((cache / "inductor").rglob("*")), "inductor wrote nothing to TIUE_COMPILE_CACHE_DIR"
    if hasattr(torch.compiler, "save_cache_artifacts"):
        assert list(cache.glob("mega-cache-torch-*.bin"))
    warm, warm_sum = _warm_in_a_process(cache)
    assert warm_sum == pytest.approx(cold_sum, rel=1e-5)
    assert warm < 0.7 * cold, f"warm-up from the cache took {warm:.1f}s, cold {cold:.1f}s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (reduce-overhead) need a GPU")
def test_cuda_graph_warmup_replays(tiny_model_dir: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(
        EngineConfig(
            tiny_model_dir,
            device="cuda",
            torch_compile=TorchCompile.REDUCE_OVERHEAD,
            compile_cache_dir=tmp_path,
            max_batch_size=2,
        )
    )
    pipe.warmup()
    before = _graphs()
    images = pipe.generate([_req(1)]).images
    assert _graphs() == before and images[0].pixels.std() > 0
