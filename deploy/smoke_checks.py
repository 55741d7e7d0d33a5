#!/usr/bin/env python3
"""The container smoke's checks of a running tiue-serve, in one place.

deploy/smoke_podman.sh runs them against the container; tests/deploy/test_smoke_checks.py runs the same
functions against a live `tiue serve` in CI, so a renamed metric, a new label or a changed answer fails
a test before it fails the smoke. Metrics are read with Prometheus' own text-format parser and summed
over every label set, so a label added later changes nothing.

Runs on the host's python3 with the standard library and prometheus_client (the smoke puts the
wheelhouse's prometheus_client wheel on PYTHONPATH, so nothing need be installed). Each command prints `ok   …` lines; a failed check prints its reason as
the last line on stderr and exits 1 (2 for a bad argument).

Usage: smoke_checks.py URL generate
       smoke_checks.py URL metrics [--min-images N]
       smoke_checks.py URL drain --in-flight-file PATH
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What /metrics must show after `generate`: family name -> type (text format: a counter's family name has
# no `_total`). service/metrics.py owns the names; the test runs this against the real server.
REQUIRED_FAMILIES = {
    "tiue_request_duration_seconds": "histogram",
    "tiue_queue_wait_seconds": "histogram",
    "tiue_batch_size_images": "histogram",
    "tiue_stage_duration_seconds": "histogram",
    "tiue_images_generated": "counter",
    "tiue_queue_depth": "gauge",
    "tiue_in_flight_requests": "gauge",
    "tiue_ready": "gauge",
}
GENERATION_ROUTES = ("/generate", "/v1/images/generations")


class CheckFailed(Exception):
    """A check that did not hold; its message is the reason the smoke prints."""


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Metrics:
    """A /metrics page: each family's type, and every sample (name, labels, value)."""

    families: dict[str, str]
    samples: tuple[tuple[str, dict[str, str], float], ...]

    def total(self, sample: str, where: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
        """The sample's value summed over every label set (that `where` accepts); 0 when there is none."""
        return sum(value for name, labels, value in self.samples if name == sample and where(labels))


def parse_metrics(text: str) -> Metrics:
    """Prometheus text format -> Metrics (raises ValueError on text that is not that format)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        samples += [(sample.name, dict(sample.labels), sample.value) for sample in family.samples]
    return Metrics(families, tuple(samples))


def request(url: str, body: dict[str, Any] | None = None, accept: str = "application/json") -> Answer:
    """GET (no body) or POST a JSON body; an HTTP error is an Answer too, a connection error raises."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": accept, **({"Content-Type": "application/json"} if data else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, raw_headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, raw_headers, payload = error.code, error.headers, error.read()
    except OSError as error:
        raise CheckFailed(f"{url}: {error}") from error
    lowered = {name.lower(): value for name, value in raw_headers.items()}
    return Answer(status, lowered.get("content-type", "").split(";")[0], lowered, payload)


def fetch_metrics(url: str) -> Metrics:
    answer = request(f"{url}/metrics", accept="text/plain")
    if answer.status != 200:
        raise CheckFailed(f"/metrics answered {answer.status}")
    try:
        return parse_metrics(answer.body.decode())
    except ValueError as error:
        raise CheckFailed(f"/metrics is not Prometheus text format: {error}") from error


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != PNG_SIGNATURE:
        raise CheckFailed(f"not a PNG: starts with {data[:16]!r}")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def check_generate(url: str) -> list[str]:
    """POST /generate for a raw PNG (status, type, signature, seed header), then two images as JSON
    (two distinct PNGs with their seeds): three images in all."""
    raw = request(
        f"{url}/generate", {"prompt": "a red circle on a white background", "n": 1, "seed": 7}, "image/png"
    )
    if (raw.status, raw.content_type) != (200, "image/png"):
        raise CheckFailed(f"raw PNG request answered {raw.status} {raw.content_type}: {raw.body[:300]!r}")
    width, height = png_size(raw.body)
    done = [f"PNG {width}x{height}, {len(raw.body)} bytes"]
    if raw.headers.get("x-seed") != "7":
        raise CheckFailed(f"X-Seed header is {raw.headers.get('x-seed')!r}, expected '7'")
    done.append("seed header: 7")

    batch = request(f"{url}/generate", {"prompt": "a blue square", "n": 2, "seed": 11})
    if batch.status != 200:
        raise CheckFailed(f"JSON request answered {batch.status}: {batch.body[:300]!r}")
    body = json.loads(batch.body)
    images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    if len(images) != 2:
        raise CheckFailed(f"asked for 2 images, got {len(images)}")
    for image in images:
        png_size(image)
    if images[0] == images[1]:
        raise CheckFailed("two seeds gave the same image")
    seeds = [item.get("seed") for item in body["data"]]
    if seeds != [11, 12]:
        raise CheckFailed(f"seeds {seeds}, expected [11, 12]")
    done.append(f"JSON: 2 PNGs, seeds {seeds}, timings {body.get('timings')}")
    return done


def check_metrics(url: str, min_images: int) -> list[str]:
    return verify_metrics(fetch_metrics(url), min_images)


def verify_metrics(metrics: Metrics, min_images: int) -> list[str]:
    """Every required family with its type; at least `min_images` images generated (whatever the labels),
    and the generation requests, queue waits, batches and stages that made them observed; ready."""
    for name, kind in REQUIRED_FAMILIES.items():
        if name not in metrics.families:
            raise CheckFailed(f"/metrics has no {name}")
        if metrics.families[name] != kind:
            raise CheckFailed(f"/metrics: {name} is a {metrics.families[name]}, expected a {kind}")
    images = metrics.total("tiue_images_generated_total")
    if images < min_images:
        raise CheckFailed(f"tiue_images_generated_total is {images:g}, expected >= {min_images}")
    requests = metrics.total(
        "tiue_request_duration_seconds_count",
        lambda labels: labels.get("route") in GENERATION_ROUTES and labels.get("status") == "200",
    )
    if requests < 1:
        raise CheckFailed("tiue_request_duration_seconds_count has no answered generation request")
    for name in ("tiue_queue_wait_seconds", "tiue_batch_size_images", "tiue_stage_duration_seconds"):
        if metrics.total(f"{name}_count") < 1:
            raise CheckFailed(f"{name} has no observation")
    ready = metrics.total("tiue_ready")
    if ready != 1:
        raise CheckFailed(f"tiue_ready is {ready:g}, expected 1")
    return [f"metric families present; tiue_images_generated_total={images:g}; tiue_ready={ready:g}"]


DRAIN_REQUESTS, DRAIN_IMAGES = 6, 4  # a burst that keeps the device busy for a while after SIGTERM


def drain(url: str, in_flight_file: Path, timeout_s: float = 20) -> list[str]:
    """Send a burst of requests; once all have arrived and images are queued, create `in_flight_file` (the
    caller then stops the server). Every image queued at that moment must come back 200 after it.

    A request still being read and validated when the server is stopped was never queued: it is refused
    503 `not_ready` with Retry-After (another replica takes it), which is the drain's contract too.
    """
    answers: list[tuple[float, Answer | BaseException]] = []  # (when it came back, what)

    def send(seed: int) -> None:
        body = {"prompt": "a green triangle", "n": DRAIN_IMAGES, "seed": seed}
        try:
            answer: Answer | BaseException = request(f"{url}/generate", body)
        except BaseException as error:  # reported by the main thread
            answer = error
        answers.append((time.monotonic(), answer))

    senders = [threading.Thread(target=send, args=(100 * i,), daemon=True) for i in range(DRAIN_REQUESTS)]
    for sender in senders:
        sender.start()
    # Answers are counted before the scrape: one answered in between is in neither count, so the wait can
    # only run long, never end early; and an image queued at the scrape comes back after `scraped`.
    deadline = time.monotonic() + timeout_s
    while True:
        scraped, answered = time.monotonic(), len(answers)
        metrics = fetch_metrics(url)
        running, queued = metrics.total("tiue_in_flight_requests"), metrics.total("tiue_queue_depth")
        if queued >= 1 and answered + running >= DRAIN_REQUESTS:
            break
        if answered == DRAIN_REQUESTS:
            raise CheckFailed("the requests were all answered before the server could be stopped")
        if time.monotonic() > deadline:
            raise CheckFailed(
                f"the requests were not all in flight with images queued within {timeout_s:g} s"
            )
        time.sleep(0.01)
    in_flight_file.touch()
    for sender in senders:
        sender.join(150)
    if len(answers) != DRAIN_REQUESTS:
        raise CheckFailed(f"{DRAIN_REQUESTS - len(answers)} of {DRAIN_REQUESTS} requests got no answer")
    after, answered_after, refused = 0, 0, 0
    for when, answer in answers:
        if isinstance(answer, BaseException):
            raise CheckFailed(f"a request in flight failed: {answer}")
        if answer.status == 200:
            images = len(json.loads(answer.body)["data"])
            if images != DRAIN_IMAGES:
                raise CheckFailed(f"a request in flight got {images} images, not {DRAIN_IMAGES}")
            if when > scraped:
                after, answered_after = after + images, answered_after + 1
        elif answer.status == 503 and _code(answer) == "not_ready" and "retry-after" in answer.headers:
            refused += 1
        else:
            raise CheckFailed(
                f"a request in flight got {answer.status} during shutdown: {answer.body[:300]!r}"
            )
    if after < queued:
        raise CheckFailed(
            f"{queued:g} images were queued when the server was stopped, only {after} came back 200"
        )
    done = [
        f"{queued:g} images queued at the stop: all answered 200 ({answered_after} requests, {after} images)"
    ]
    if refused:
        done.append(
            f"{refused} requests still being read at the stop: refused 503 not_ready with Retry-After"
        )
    return done


def _code(answer: Answer) -> str | None:
    try:
        code = json.loads(answer.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:18080")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("generate", help="a raw PNG and two images as JSON")
    metrics = commands.add_parser("metrics", help="the metric families and their values")
    metrics.add_argument("--min-images", type=int, default=3)
    drained = commands.add_parser("drain", help="a request in flight while the caller stops the server")
    drained.add_argument("--in-flight-file", type=Path, required=True)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        if args.command == "generate":
            done = check_generate(url)
        elif args.command == "metrics":
            done = check_metrics(url, args.min_images)
        else:
            done = drain(url, args.in_flight_file)
    except CheckFailed as failure:
        print(failure, file=sys.stderr)
        return 1
    for line in done:
        print(f"ok   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
