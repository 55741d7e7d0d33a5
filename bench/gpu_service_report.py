"""bench/gpu_service.py's tables: rows as they come, rewritten (markdown and JSON) after every one."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "@@ "  # a child's record lines start with this; everything else it prints is its log

# The targets (H200, fp16, SD2.1-base-sized, 512x512, tiny decoder).
TARGETS = {
    "engine_b1_ms": 15.0,
    "client_p50_c1_ms": 25.0,
    "added_c1_ms": 5.0,
    "saturation_images_s": 200.0,
    "service_over_direct": 0.90,
    "ready_from_artefacts_s": 30.0,
    "over_peer_b1": 1.5,
}


def emit(section: str, record: dict[str, Any]) -> None:
    """A child's record, for the parent's report."""
    print(MARK + json.dumps({"section": section, **record}), flush=True)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass
class Report:
    out: Path | None
    header: str
    settings: dict[str, str] = field(default_factory=dict)
    sections: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"starts": [], "direct": [], "service": [], "encode": [], "peer": []}
    )
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, record: dict[str, Any]) -> None:
        self.sections[section].append(record)
        print(f"{section}: {json.dumps(record)}", flush=True)
        self.save()

    def note(self, text: str) -> None:
        print(f"- {text}", flush=True)
        self.notes.append(text)
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        (self.out / "gpu_service.md").write_text(self.render())
        data = {"header": self.header, "settings": self.settings, **self.sections, "summary": self.summary()}
        (self.out / "gpu_service.json").write_text(json.dumps({**data, "notes": self.notes}, indent=1))

    # -- derived figures ---------------------------------------------------------------------------

    def summary(self) -> dict[str, float | None]:
        """The figures the targets speak of, from whatever rows exist."""
        direct = {r["batch"]: r for r in self.sections["direct"]}
        service = {r["concurrency"]: r for r in self.sections["service"]}
        peer = {r["batch"]: r for r in self.sections["peer"]}
        c1, b1 = service.get(1), direct.get(1)
        ceiling = max((r["images_s"] for r in direct.values()), default=None)
        top = service[max(service)] if service else None
        aot = [s for s in self.sections["starts"] if s["artefacts"].startswith("built")]
        return {
            "engine_b1_ms": b1["p50_ms"] if b1 else None,
            "client_p50_c1_ms": c1["p50_ms"] if c1 else None,
            "added_c1_ms": c1["p50_ms"] - b1["p50_ms"] if c1 and b1 else None,
            "added_in_place_c1_ms": c1["added_p50_ms"] if c1 else None,
            "saturation_images_s": top["images_s"] if top else None,
            "direct_ceiling_images_s": ceiling,
            "service_over_direct": top["images_s"] / ceiling if top and ceiling else None,
            "ready_from_artefacts_s": aot[0]["ready_s"] if aot else None,
            "over_peer_b1": peer[1]["p50_ms"] / b1["p50_ms"] if 1 in peer and b1 else None,
            "over_peer_b8": peer[8]["p50_ms"] / direct[8]["p50_ms"] if 8 in peer and 8 in direct else None,
        }

    # -- markdown ----------------------------------------------------------------------------------

    def render(self) -> str:
        s = self.sections
        lines = [f"## The service on one GPU: {self.header}", ""]
        if self.settings:
            lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(self.settings.items())), ""]
        lines += [
            "### Start to ready",
            "",
            "| what started | artefacts / cache | start to ready s | note |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['what']} | {r['artefacts']} | {_f(r['ready_s'])} | {r.get('log', '')} |"
            for r in s["starts"]
        ]
        lines += [
            "",
            "### The engine called directly (the ceiling; median per call, a new prompt each call)",
            "",
        ]
        lines += [
            "| batch | total ms | text ms | denoise ms | decode ms | images/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["direct"]:
            lines.append(
                f"| {r['batch']} | {_f(r['p50_ms'])} | {_f(r.get('text_encode'))} | {_f(r.get('denoise'))} | "
                f"{_f(r.get('vae_decode'))} | {_f(r['images_s'])} |"
            )
        lines += ["", "### The service, closed loop (one image a request, raw bytes)", ""]
        lines += [
            "| concurrency | images/s | client p50 ms | client p99 ms | engine p50 ms | added p50 ms | mean batch | requests | statuses |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["service"]:
            statuses = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
            lines.append(
                f"| {r['concurrency']} | {_f(r['images_s'])} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | "
                f"{_f(r['engine_p50_ms'])} | {_f(r['added_p50_ms'])} | {_f(r['mean_batch'], 2)} | "
                f"{r['requests']} | {statuses} |"
            )
        lines += ["", "### Image encoding (service/images.py's encoder, median of repeated encodes)", ""]
        lines += ["| image | size | format | ms | KB |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['image']} | {r['size']} | {r['format']} | {_f(r['ms'], 2)} | {_f(r['kb'])} |"
            for r in s["encode"]
        ]
        lines += ["", "### Peer: diffusers StableDiffusionPipeline, 4 looped DDIM steps, torch.compile", ""]
        lines += ["| batch | total ms | images/s | compile + warm-up s |", "|---|---|---|---|"]
        lines += [
            f"| {r['batch']} | {_f(r['p50_ms'])} | {_f(r['images_s'])} | {_f(r.get('warm_s'))} |"
            for r in s["peer"]
        ]
        lines += [
            "",
            "### Against the targets",
            "",
            "| figure | measured | target | met |",
            "|---|---|---|---|",
        ]
        for name, value in self.summary().items():
            target = TARGETS.get(name)
            higher = name in ("saturation_images_s", "service_over_direct", "over_peer_b1")
            met = (
                "-"
                if value is None or target is None
                else ("yes" if (value >= target if higher else value <= target) else "no")
            )
            bound = "-" if target is None else (f"≥ {target:g}" if higher else f"≤ {target:g}")
            lines.append(f"| {name} | {_f(value, 2)} | {bound} | {met} |")
        return "\n".join([*lines, "", *[f"- {n}" for n in self.notes], ""])
