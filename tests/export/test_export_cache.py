"""The artefact cache: what goes into a key, atomic entries, and never loading a stale or damaged one."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.errors import BackendUnavailableError
from engine.export.cache import (
    ArtefactKey,
    ArtefactStore,
    Entry,
    batch_acceptor,
    find_or_build,
)
from engine.export.profiles import Profile, Range
from engine.files import model_content_hash

PROFILE = Profile(Range(1, 2, 4), Range(4, 8, 12), Range(4, 8, 12))
KEY = ArtefactKey(
    kind="tensorrt",
    model_hash="ab" * 32,
    steps=4,
    precision="fp16",
    profiles=(PROFILE,),
    exporter="torchscript-opset18",
    libraries=(("tensorrt", "10.9.0"), ("torch", "2.13.0")),
    compute_capability="sm_90",
)


def _fake_model(root: Path) -> Path:
    for name, files in {
        "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json"],
        "text_encoder": ["config.json"],
        "tokenizer": ["vocab.json"],
        "scheduler": ["scheduler_config.json"],
    }.items():
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_text(f"{name}/{f}")
    (root / "model_index.json").write_text("{}")
    return root


def test_model_hash_follows_content_not_bystanders(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "m")
    memo = tmp_path / "memo.json"
    first = model_content_hash(model, memo)
    assert model_content_hash(model, memo) == first
    (model / "README.md").write_text("docs")
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "model.safetensors").write_text("not part of any graph")
    assert model_content_hash(model, memo) == first
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_text("other weights")
    changed = model_content_hash(model, memo)
    assert changed != first
    (model / "scheduler" / "scheduler_config.json").write_text('{"clip_sample": true}')
    assert model_content_hash(model, memo) not in (first, changed)


def test_model_hash_is_remembered_per_file_by_size_and_mtime(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "m")
    memo = tmp_path / "memo.json"
    model_content_hash(model, memo)
    remembered = json.loads(memo.read_text())
    weights = str((model / "unet" / "diffusion_pytorch_model.safetensors").resolve())
    assert weights in remembered
    # A forged memo entry with the file's real size and mtime is trusted (so it is not re-read)...
    remembered[weights][2] = "0" * 64
    memo.write_text(json.dumps(remembered))
    forged = model_content_hash(model, memo)
    assert forged != model_content_hash(model, tmp_path / "fresh-memo.json")
    # ...and a changed file (new size) is hashed again, whatever the memo says.
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_text("new weights, new size")
    assert model_content_hash(model, memo) != forged


@pytest.mark.parametrize(
    "change",
    [
        {"model_hash": "cd" * 32},
        {"precision": "fp32"},
        {"profiles": (Profile(Range(1, 4, 8), PROFILE.height, PROFILE.width),)},
        {"profiles": (Profile(PROFILE.batch, Range(4, 8, 16), PROFILE.width),)},
        {"profiles": (PROFILE, PROFILE)},
        {"libraries": (("tensorrt", "10.10.0"), ("torch", "2.13.0"))},
        {"libraries": (("tensorrt_rtx", "10.9.0"), ("torch", "2.13.0"))},
        {"libraries": (("tensorrt", "10.9.0"), ("torch", "2.14.0"))},
        {"compute_capability": "sm_89"},
        {"steps": 2},
        {"exporter": "torchscript-opset19"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_field_changes_the_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert other.digest != KEY.digest and other.dirname != KEY.dirname
    if "profiles" not in change:
        assert KEY.mismatches(other), "a difference outside the profiles must be named"


def test_key_round_trips_through_json() -> None:
    assert ArtefactKey.from_dict(json.loads(json.dumps(KEY.to_dict()))) == KEY
    assert dataclasses.replace(KEY).digest == KEY.digest


def test_mismatches_name_the_field_and_both_values() -> None:
    other = dataclasses.replace(
        KEY, compute_capability="sm_80", libraries=(("tensorrt", "10.3.0"), ("torch", "2.13.0"))
    )
    text = "; ".join(KEY.mismatches(other))
    assert "compute capability sm_80 (want sm_90)" in text
    assert "tensorrt 10.3.0 (want 10.9.0)" in text


def _writer(payload: bytes = b"plan") -> Callable[[Path], Iterator[tuple[str, Path]]]:
    def write(tmp: Path) -> Iterator[tuple[str, Path]]:
        for name in ("text_encoder", "denoiser", "vae_decoder"):
            path = tmp / f"{name}.plan"
            path.write_bytes(payload + name.encode())
            yield name, path

    return write


def _store_with(tmp_path: Path, *keys: ArtefactKey) -> ArtefactStore:
    store = ArtefactStore(tmp_path / "engines")
    for key in keys:
        store.create(key, _writer(), {"model_name": "tiny"})
    return store


def test_entries_are_written_whole_with_a_manifest(tmp_path: Path) -> None:
    store = _store_with(tmp_path, KEY)
    (entry,) = store.entries()
    assert entry.path.name == KEY.dirname and entry.key == KEY
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["digest"] == KEY.digest and manifest["key"]["compute_capability"] == "sm_90"
    assert set(manifest["files"]) == {"text_encoder", "denoiser", "vae_decoder"}
    assert all(len(m["sha256"]) == 64 for m in manifest["files"].values())
    assert [p.name for p in store.root.iterdir()] == [KEY.dirname], "no temporary folders are left behind"


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path / "engines")

    def broken(tmp: Path) -> Iterator[tuple[str, Path]]:
        (tmp / "denoiser.plan").write_bytes(b"half")
        yield "denoiser", tmp / "denoiser.plan"
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        store.create(KEY, broken, {})
    assert store.entries() == [] and list(store.root.iterdir()) == []


def test_a_second_build_of_the_same_key_keeps_one_entry(tmp_path: Path) -> None:
    store = _store_with(tmp_path, KEY, KEY)
    assert len(store.entries()) == 1


def test_find_prefers_the_exact_key_and_accepts_other_profiles(tmp_path: Path) -> None:
    wide = dataclasses.replace(KEY, profiles=(Profile(Range(1, 4, 8), Range(4, 8, 16), Range(4, 8, 16)),))
    store = _store_with(tmp_path, wide)
    entry, _ = store.find(KEY, batch_acceptor(4))
    assert entry is not None and entry.key == wide, "another profile that serves the batch is fine"
    store.create(KEY, _writer(), {})
    entry, _ = store.find(KEY, batch_acceptor(4))
    assert entry is not None and entry.key == KEY


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"compute_capability": "sm_80"}, "compute capability sm_80 (want sm_90)"),
        ({"libraries": (("tensorrt", "10.3.0"), ("torch", "2.13.0"))}, "tensorrt 10.3.0 (want 10.9.0)"),
        ({"precision": "fp32"}, "precision fp32 (want fp16)"),
        ({"model_hash": "cd" * 32}, "model content cdcdcdcdcdcd (want abababababab)"),
        ({"steps": 8}, "steps 8 (want 4)"),
    ],
)
def test_stale_entries_are_never_loaded_and_the_error_names_why(
    tmp_path: Path, change: dict[str, object], named: str
) -> None:
    store = _store_with(tmp_path, dataclasses.replace(KEY, **change))  # type: ignore[arg-type]
    entry, rejected = store.find(KEY, batch_acceptor(4))
    assert entry is None and named in rejected[0]
    with pytest.raises(BackendUnavailableError, match="no usable tensorrt artefacts") as info:
        find_or_build(store, KEY, batch_acceptor(4), None, "Run tiue build-engines.")
    assert named in str(info.value) and "Run tiue build-engines." in str(info.value)


def test_a_profile_too_small_for_the_batch_is_passed_over(tmp_path: Path) -> None:
    store = _store_with(tmp_path, KEY)
    entry, rejected = store.find(KEY, batch_acceptor(8))
    assert entry is None and "batches up to 4, below max_batch_size 8" in rejected[0]


def test_a_mismatch_rebuilds_when_building_is_allowed(tmp_path: Path) -> None:
    store = _store_with(tmp_path, dataclasses.replace(KEY, compute_capability="sm_80"))
    built: list[Entry] = []

    def build() -> Entry:
        built.append(store.create(KEY, _writer(), {}))  # type: ignore[arg-type]
        return built[-1]

    entry = find_or_build(store, KEY, batch_acceptor(4), build, "")
    assert built and entry.key == KEY
    assert find_or_build(store, KEY, batch_acceptor(4), None, "").path == entry.path


@pytest.mark.parametrize("damage", ["delete", "truncate", "manifest"])
def test_damaged_entries_are_not_loaded_and_are_replaced(tmp_path: Path, damage: str) -> None:
    store = _store_with(tmp_path, KEY)
    path = store.root / KEY.dirname
    if damage == "delete":
        (path / "denoiser.plan").unlink()
    elif damage == "truncate":
        (path / "denoiser.plan").write_bytes(b"p")
    else:
        (path / "manifest.json").write_text("{not json")
    entry, _ = store.find(KEY, batch_acceptor(4))
    assert entry is None
    rebuilt = store.create(KEY, _writer(), {})
    assert rebuilt.problems() == [] and store.find(KEY, batch_acceptor(4))[0] is not None


def test_an_unrelated_folder_in_the_engine_dir_is_ignored(tmp_path: Path) -> None:
    store = _store_with(tmp_path, KEY)
    shutil.copytree(store.root / KEY.dirname, store.root / "notes")
    (store.root / "onnx-garbage").mkdir()
    assert [e.path.name for e in store.entries()] == [KEY.dirname]
