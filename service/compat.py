"""Parameters accepted for compatibility with other image APIs but not honoured: one warning each.

OpenAI's request body is accepted with fields this server does not use (so that tools written for
OpenAI work unchanged), but nothing is dropped in silence: each such field is named in the answer's
`warnings` (and its `X-Warning` header). A name or value is echoed only when it is a plain token, so a
hostile body cannot put a line break or a page of text into a header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from engine.types import Decoder, ModelInfo
from service.images import OutputFormat
from service.schemas import OpenAIImageRequest

_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_NAMED_AT_MOST = 8  # unknown fields named in the warning; the rest are counted
_IGNORED = "accepted for compatibility and ignored"


def _shown(value: Any) -> str:
    text = str(value)
    return f"'{text}'" if _TOKEN.fullmatch(text) else "this value"


def compression_warnings(output_format: OutputFormat, compression: int | None) -> list[str]:
    """`output_compression` is a jpeg/webp quality; a png is encoded losslessly whatever it says."""
    if compression is None or output_format != "png":
        return []
    return ["output_compression applies to jpeg and webp; ignored for png"]


def openai_warnings(body: OpenAIImageRequest, info: ModelInfo) -> list[str]:
    """What of an OpenAI images request this server accepted but will not honour, one line per parameter."""
    warnings: list[str] = []
    if body.quality not in (None, "auto", "low"):
        warnings.append(
            f"quality {_shown(body.quality)} was ignored: only 'low' (the tiny decoder) changes anything here"
        )
    elif body.quality == "low" and Decoder.TINY not in info.decoders:
        warnings.append(f"quality 'low' was ignored: model {info.name} has no tiny decoder")
    for name in ("style", "user"):
        if getattr(body, name) is not None:
            warnings.append(f"{name} is {_IGNORED}")
    warnings += unknown_field_warnings(body.model_extra or {})
    warnings += compression_warnings(body.output_format or "png", body.output_compression)
    return warnings


def unknown_field_warnings(extra: Mapping[str, Any]) -> list[str]:
    """Fields OpenAI's API (or another's, such as `negative_prompt`) has and this server does not know."""
    named = [name for name in extra if _TOKEN.fullmatch(name)]
    shown = named[:_NAMED_AT_MOST]
    others = len(extra) - len(shown)
    warnings = [f"{name} is not supported by this server and was ignored" for name in shown]
    if others:
        warnings.append(f"{others} other unknown {_plural(others, 'field')} ignored")
    return warnings


def _plural(count: int, word: str) -> str:
    return f"{word}{'' if count == 1 else 's'} {'was' if count == 1 else 'were'}"
