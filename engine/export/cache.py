"""The artefact cache: ONNX graphs and TensorRT engines under a key of everything they depend on.

Layout: ``<root>/<kind>-<digest>/`` holds the artefacts and a ``manifest.json`` naming the full key.
An entry is written in a private temporary folder and renamed into place, manifest last, so a reader
sees a whole entry or none. A lookup compares every field of the key, so a file built from other
weights, in another precision, by another library version or for another GPU is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.errors import BackendUnavailableError
from engine.export.profiles import Profile
from engine.files import cache_root, file_sha256, model_content_hash, write_atomic
from engine.loading import Components

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def components_hash(components: Components, memo_path: Path | None = None) -> str:
    """The content hash of what was loaded: the model folder, and a tiny decoder from elsewhere."""
    return model_content_hash(components.path, memo_path, components.vae_tiny_path)


# -- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtefactKey:
    """Everything an artefact depends on. Equal keys give interchangeable artefacts."""

    kind: str  # "onnx" or "tensorrt"
    model_hash: str
    steps: int  # baked into the denoiser graph with the folded DDIM constants
    precision: str
    profiles: tuple[Profile, ...]
    exporter: str  # e.g. "torchscript-opset18"
    libraries: tuple[tuple[str, str], ...]  # (name, version) of what produced it: torch, tensorrt
    compute_capability: str | None = None  # TensorRT engines: the GPU they were built for

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_hash": self.model_hash,
            "steps": self.steps,
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "exporter": self.exporter,
            "libraries": dict(self.libraries),
            "compute_capability": self.compute_capability,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtefactKey:
        return cls(
            kind=data["kind"],
            model_hash=data["model_hash"],
            steps=int(data["steps"]),
            precision=data["precision"],
            profiles=tuple(Profile.from_dict(p) for p in data["profiles"]),
            exporter=data["exporter"],
            libraries=tuple(sorted(data["libraries"].items())),
            compute_capability=data.get("compute_capability"),
        )

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def dirname(self) -> str:
        return f"{self.kind}-{self.digest}"

    def mismatches(self, other: ArtefactKey) -> list[str]:
        """What differs from `other` apart from the profiles, in words (ours first, then theirs)."""
        out = []
        if self.model_hash != other.model_hash:
            out.append(f"model content {other.model_hash[:12]} (want {self.model_hash[:12]})")
        for name in ("steps", "precision", "exporter", "compute_capability"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name.replace('_', ' ')} {theirs} (want {mine})")
        mine_libs, their_libs = dict(self.libraries), dict(other.libraries)
        for lib in sorted(set(mine_libs) | set(their_libs)):
            if mine_libs.get(lib) != their_libs.get(lib):
                out.append(f"{lib} {their_libs.get(lib, 'absent')} (want {mine_libs.get(lib, 'absent')})")
        return out


# -- entries and the store ---------------------------------------------------------------------


@dataclass
class Entry:
    """One complete cache entry: a folder of artefacts and the key they were built for."""

    path: Path
    key: ArtefactKey
    files: dict[str, dict[str, Any]]  # component -> {"file", "bytes", "sha256"}
    info: dict[str, Any] = field(default_factory=dict)

    def file(self, component: str) -> Path:
        return self.path / self.files[component]["file"]

    def problems(self) -> list[str]:
        """Files missing or of another size than the manifest says (a damaged entry is never loaded)."""
        out = []
        for component, meta in self.files.items():
            p = self.path / meta["file"]
            if not p.is_file():
                out.append(f"{component}: {p.name} is missing")
            elif p.stat().st_size != meta["bytes"]:
                out.append(
                    f"{component}: {p.name} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
                )
        return out


def describe_file(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class ArtefactStore:
    """A folder of cache entries."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entries(self, kind: str | None = None) -> list[Entry]:
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for manifest in sorted(self.root.glob(f"{kind or '*'}-*/{MANIFEST}")):
            try:
                data = json.loads(manifest.read_text())
                if data.get("format") != MANIFEST_FORMAT:
                    continue
                out.append(
                    Entry(
                        manifest.parent,
                        ArtefactKey.from_dict(data["key"]),
                        data["files"],
                        data.get("info", {}),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable manifest %s: %s", manifest, exc)
        return out

    def exact(self, key: ArtefactKey) -> Entry | None:
        """The undamaged entry built for exactly `key`, if there is one."""
        return next((e for e in self.entries(key.kind) if e.key == key and not e.problems()), None)

    def find(
        self, want: ArtefactKey, accept: Callable[[Entry], str | None]
    ) -> tuple[Entry | None, list[str]]:
        """An entry whose key matches `want` in everything but profiles, and that `accept` takes.

        The exact key wins; else the newest acceptable one. Also returns, for an error message, why
        each other entry of that kind was passed over.
        """
        candidates, rejected = [], []
        for entry in self.entries(want.kind):
            reasons = want.mismatches(entry.key) + entry.problems()
            if not reasons and (why := accept(entry)):
                reasons.append(why)
            if reasons:
                rejected.append(f"{entry.path.name}: {'; '.join(reasons)}")
            else:
                candidates.append(entry)
        if not candidates:
            return None, rejected
        exact = [e for e in candidates if e.key == want]
        best = exact[0] if exact else max(candidates, key=lambda e: float(e.info.get("created_unix", 0.0)))
        return best, rejected

    def create(
        self, key: ArtefactKey, write: Callable[[Path], Iterable[tuple[str, Path]]], info: dict[str, Any]
    ) -> Entry:
        """Build an entry: `write(tmp_dir)` writes the artefacts and yields (component, path) pairs.

        If another process finished the same key first, its entry is kept and ours discarded.
        """
        final = self.root / key.dirname
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key.dirname}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            files = {component: describe_file(path) for component, path in write(tmp)}
            manifest = {
                "format": MANIFEST_FORMAT,
                "digest": key.digest,
                "key": key.to_dict(),
                "files": files,
                "info": {**info, "created_unix": time.time()},
            }
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
            if final.exists():
                self._discard_if_damaged(final, key.kind)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
                log.info("another process built %s first; keeping its entry", final.name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        entry = next((e for e in self.entries(key.kind) if e.path == final), None)
        if entry is None:
            raise OSError(f"cache entry {final} was not readable after writing it")
        return entry

    def _discard_if_damaged(self, path: Path, kind: str) -> None:
        """A folder at the final name without a readable manifest, or with damaged files, is a leftover."""
        entry = next((e for e in self.entries(kind) if e.path == path), None)
        if entry is None or entry.problems():
            log.warning("removing incomplete cache entry %s", path)
            shutil.rmtree(path, ignore_errors=True)


# -- lookup for the backends ---------------------------------------------------------------------


def engine_store(config: EngineConfig) -> ArtefactStore:
    """The configured engine folder, else `<cache root>/engines`."""
    return ArtefactStore(config.engine_dir or cache_root(config.cache_dir) / "engines")


def config_hash(components: Components, config: EngineConfig) -> str:
    """`components_hash`, its per-file memo in the configured cache root."""
    return components_hash(components, cache_root(config.cache_dir) / "file-hashes.json")


def batch_acceptor(max_batch_size: int) -> Callable[[Entry], str | None]:
    """Takes entries whose every profile serves the pipeline's largest batch."""

    def accept(entry: Entry) -> str | None:
        top = min(p.batch.max for p in entry.key.profiles)
        if top < max_batch_size:
            return f"profiles serve batches up to {top}, below max_batch_size {max_batch_size}"
        return None

    return accept


def find_or_build(
    store: ArtefactStore,
    want: ArtefactKey,
    accept: Callable[[Entry], str | None],
    build: Callable[[], Entry] | None,
    hint: str,
) -> Entry:
    """The matching entry; else a fresh build when `build` is given; else an error naming every mismatch."""
    entry, rejected = store.find(want, accept)
    if entry is not None:
        log.info("using cached %s artefacts %s", want.kind, entry.path)
        return entry
    why = "; ".join(rejected) if rejected else "there are none"
    if build is None:
        raise BackendUnavailableError(
            f"no usable {want.kind} artefacts for model {want.model_hash[:12]} in {store.root}: {why}. {hint}"
        )
    log.info("building %s artefacts in %s (%s)", want.kind, store.root, why)
    started = time.perf_counter()
    entry = build()
    log.info("built %s in %.1fs", entry.path, time.perf_counter() - started)
    return entry
