"""The stage table behind the CLI: names, defaults and the order `all` runs them in."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from engine.distill.tokenizer import save_tokenizer


def _data(a: argparse.Namespace) -> None:
    save_tokenizer(a.workdir / "tokenizer")


def _vae(a: argparse.Namespace) -> None:
    from engine.distill.vae import encode_cache, train_vae

    train_vae(a.workdir, steps=a.steps or 1200, batch=a.batch or 32, seed=a.seed)
    encode_cache(a.workdir, n=30_000, seed=a.seed)


STAGES: dict[str, Callable[[argparse.Namespace], None]] = {
    "data": _data,
    "vae": _vae,
}
ORDER = ("data", "vae")


def _all(a: argparse.Namespace) -> None:
    for name in ORDER:
        STAGES[name](a)


STAGES["all"] = _all


def run(stage: str, args: argparse.Namespace) -> None:
    STAGES[stage](args)
