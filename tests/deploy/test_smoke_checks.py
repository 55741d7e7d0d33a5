"""deploy/smoke_checks.py, the container smoke's checks, run here against a live `tiue serve` on the
embedded default model (real uvicorn on 127.0.0.1, its own process): a renamed metric, a new label or a
changed answer breaks this test, not just the next hand-run of deploy/smoke_podman.sh.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import httpx
import pytest
from deploy_checks import ROOT


def load_checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smoke_checks", ROOT / "deploy" / "smoke_checks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


checks = load_checks()


def exposition(**images: int) -> str:
    """What the service's real metrics registry exports after `images[model]` images of each model."""
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(max_batch_size=4)
    for name, count in images.items():
        metrics.add_model(name, SimpleNamespace(backend="torch", precision="fp32", device="cpu"))
        metrics.images_generated.labels(model=name).inc(count)
        metrics.batch_size.labels(model=name).observe(count)
        metrics.queue_wait.labels(model=name).observe(0.01)
        metrics.stage_duration.labels(stage="denoise", model=name).observe(0.05)
        metrics.request_duration.labels(route="/generate", status="200", model=name).observe(0.1)
    metrics.ready.set(1)
    return metrics.exposition().decode()


def test_metrics_are_summed_over_every_label_set() -> None:
    text = exposition(sd15=2, sd21=3)
    assert checks.parse_metrics(text).total("tiue_images_generated_total") == 5
    assert checks.verify_metrics(checks.parse_metrics(text), min_images=5)
    with pytest.raises(checks.CheckFailed, match="is 5, expected >= 6"):
        checks.verify_metrics(checks.parse_metrics(text), min_images=6)


def test_a_new_label_changes_nothing_and_a_renamed_metric_fails() -> None:
    text = exposition(default=3)
    relabelled = text.replace(
        'tiue_images_generated_total{model="default"}',
        'tiue_images_generated_total{model="default",zone="a"}',
    )
    assert relabelled != text
    assert checks.verify_metrics(checks.parse_metrics(relabelled), min_images=3)
    renamed = text.replace("tiue_ready", "tiue_is_ready")
    with pytest.raises(checks.CheckFailed, match="/metrics has no tiue_ready"):
        checks.verify_metrics(checks.parse_metrics(renamed), min_images=3)
    with pytest.raises(ValueError):
        checks.parse_metrics("tiue_ready{ 1\n")


def test_required_families_are_what_the_service_registers() -> None:
    families = checks.parse_metrics(exposition()).families
    for name, kind in checks.REQUIRED_FAMILIES.items():
        assert families.get(name) == kind, f"the service no longer exports {kind} {name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`tiue serve` on the default model (no TIUE_* from the caller's environment but the cache folder)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIUE_") or k == "TIUE_CACHE_DIR"}
    env["TIUE_SHUTDOWN_GRACE_S"] = "20"
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "not ready after 90 s"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)  # polling a separate process; there is nothing to await
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_the_smoke_checks_pass_against_tiue_serve(
    served: tuple[subprocess.Popen[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The smoke's steps in its order: generate, metrics, then SIGTERM with requests in flight."""
    process, url = served
    assert checks.main([url, "generate"]) == 0, capsys.readouterr().err
    assert checks.main([url, "metrics", "--min-images", "3"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ok   PNG 64x64" in out and "tiue_images_generated_total=3" in out, out

    in_flight = tmp_path / "in-flight"
    done: list[list[str] | BaseException] = []

    def drain() -> None:
        try:
            done.append(checks.drain(url, in_flight))
        except BaseException as error:
            done.append(error)

    thread = threading.Thread(target=drain)
    thread.start()
    deadline = time.monotonic() + 30
    while not in_flight.exists() and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    thread.join(60)
    output, _ = process.communicate(timeout=30)
    assert done and isinstance(done[0], list), (done, output)
    assert re.fullmatch(
        r"[1-9]\d* images queued at the stop: all answered 200 \(\d requests, \d+ images\)", done[0][0]
    )
    assert process.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal it caught
    assert "draining: taking no new work" in output and "Traceback" not in output, output


def test_a_check_against_a_dead_server_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert checks.main([url, "metrics"]) == 1
    assert capsys.readouterr().err.startswith(f"{url}/metrics: ")
