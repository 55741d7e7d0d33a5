"""The files of a pipeline folder, their content hashes, and where generated files live.

A core module: loading (to share byte-identical components) and the artefact cache (to key what it
builds) both read it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
TINY_DECODER = "vae_tiny"  # an optional AutoencoderTiny beside the VAE in a pipeline folder
_CHUNK = 1 << 22


def cache_root(configured: Path | None = None) -> Path:
    """Where generated artefacts live: `configured` (EngineConfig.cache_dir, TIUE_CACHE_DIR), else
    $XDG_CACHE_HOME/tiue-serve, else ~/.cache/tiue-serve."""
    if configured is not None:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiue-serve"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_content_hash(folder: Path) -> str:
    """sha256 over the relative path and content hash of each file in one folder (a component such
    as `vae/`): equal for byte-identical copies wherever they live."""
    folder = Path(folder)
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        total.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return total.hexdigest()


def _model_files(model_dir: Path) -> list[Path]:
    """The files that shape the graphs: model_index.json and the component folders the engine loads
    (a safety checker or README beside them does not change an engine)."""
    files = [model_dir / "model_index.json"]
    for name in (*COMPONENTS, TINY_DECODER):
        folder = model_dir / name
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted(f for f in files if f.is_file())


def model_content_hash(
    model_dir: Path, memo_path: Path | None = None, tiny_decoder_dir: Path | None = None
) -> str:
    """sha256 over the relative path and content hash of each model file (and of the files of a
    tiny decoder folder outside the model's, when one is named).

    Per-file hashes are remembered by (size, mtime) in `memo_path` (default: in the default cache
    root) so a multi-GB checkpoint is read once; the memo is best-effort and never required.
    """
    model_dir = Path(model_dir).resolve()
    memo_path = memo_path or cache_root() / "file-hashes.json"
    try:
        memo: dict[str, list[Any]] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    total, changed = hashlib.sha256(), False
    named = [(path, path.relative_to(model_dir).as_posix()) for path in _model_files(model_dir)]
    if tiny_decoder_dir is not None and not Path(tiny_decoder_dir).resolve().is_relative_to(model_dir):
        tiny = Path(tiny_decoder_dir).resolve()
        files = sorted(p for p in tiny.rglob("*") if p.is_file() and not p.name.startswith("."))
        named += [(p, f"<tiny decoder>/{p.relative_to(tiny).as_posix()}") for p in files]
    for path, label in named:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        remembered = memo.get(str(path))
        if remembered and remembered[:2] == stamp:
            file_hash = str(remembered[2])
        else:
            file_hash = file_sha256(path)
            memo[str(path)], changed = [*stamp, file_hash], True
        total.update(f"{label}\0{file_hash}\n".encode())
    if changed:
        with contextlib.suppress(OSError):
            write_atomic(memo_path, json.dumps(memo, indent=0).encode())
    return total.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
