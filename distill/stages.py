"""The stage table behind the CLI: names, defaults and the order `all` runs them in."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from distill.tokenizer import save_tokenizer


def _data(a: argparse.Namespace) -> None:
    save_tokenizer(a.workdir / "tokenizer")


def _vae(a: argparse.Namespace) -> None:
    from distill.vae import encode_cache, train_vae

    train_vae(a.workdir, steps=a.steps or 1500, batch=a.batch or 32, seed=a.seed)
    encode_cache(a.workdir, n=a.n or 30_000, seed=a.seed)


def _decoder(a: argparse.Namespace) -> None:
    from distill.vae import finetune_decoder

    finetune_decoder(a.workdir, steps=a.steps or 1500, batch=a.batch or 32, seed=a.seed)


def _tiny_decoder(a: argparse.Namespace) -> None:
    from distill.tiny_decoder import SHIPPED_MODEL, ship_tiny_decoder, train_tiny_decoder

    train_tiny_decoder(
        a.workdir,
        steps=a.steps or 3000,
        batch=a.batch or 32,
        seed=a.seed,
        n=a.n or 8192,
        n_student=a.student_latents or 0,
        student_share=0.5 if a.student_share is None else a.student_share,
        student_model=a.model or SHIPPED_MODEL,
    )
    if a.out is not None:
        ship_tiny_decoder(a.workdir, a.out)


def _tiny_eval(a: argparse.Namespace) -> None:
    from distill.ship import JUDGE_PATH
    from distill.tiny_decoder import SHIPPED_MODEL, evaluate_tiny_decoder

    evaluate_tiny_decoder(a.model or SHIPPED_MODEL, a.judge_out or JUDGE_PATH, a.workdir, a.split)


def _teacher(a: argparse.Namespace) -> None:
    from distill.teacher import train_teacher

    train_teacher(a.workdir, steps=a.steps or 6500, batch=a.batch or 32, seed=a.seed)


def _judge(a: argparse.Namespace) -> None:
    from distill.judge import train_judge

    train_judge(a.workdir, steps=a.steps or 1500, batch=a.batch or 64, seed=a.seed)


def _student(a: argparse.Namespace) -> None:
    from distill.student import RECIPES, VARIANTS, Cycle, Recipe, train_student

    fields = [f.name for f in dataclasses.fields(Recipe) if f.name != "cycles"]  # a flag each
    given = {k: v for k in fields if (v := getattr(a, k)) is not None}
    for variant in [a.variant] if a.variant else VARIANTS:
        recipe = dataclasses.replace(RECIPES[variant], **given)
        if any(v is not None for v in (a.steps, a.lr, a.pixel_weight, a.edge_weight)):
            first, last = recipe.cycles[0], recipe.cycles[-1]
            one = Cycle(
                steps=a.steps if a.steps is not None else recipe.steps,
                lr=a.lr if a.lr is not None else first.lr,
                pixel_weight=a.pixel_weight if a.pixel_weight is not None else last.pixel_weight,
                edge_weight=a.edge_weight if a.edge_weight is not None else last.edge_weight,
            )
            recipe = dataclasses.replace(recipe, cycles=(one,))
        train_student(
            a.workdir,
            variant,
            seed=a.seed,
            n_targets=a.n or 16_384,
            minutes=a.minutes,
            cycles=recipe.cycles,
            batch=recipe.batch,
            init=recipe.init,
            reg_weight=recipe.reg_weight,
            fake_warmup=recipe.fake_warmup,
            fake_updates=recipe.fake_updates,
        )


def _eval(a: argparse.Namespace) -> None:
    from distill.evaluate import run_eval

    run_eval(a.workdir, a.eval_prompts, a.split)


def _probe(a: argparse.Namespace) -> None:
    from distill.evaluate import probe_teacher

    probe_teacher(a.workdir)


def _ship(a: argparse.Namespace) -> None:
    from distill.ship import draw_grid, judge_beside, ship

    out = ship(a.workdir, a.variant or "regress", a.out, a.judge_out or judge_beside(a.out))
    draw_grid(out, a.workdir / "eval" / "grid.png")


STAGES: dict[str, Callable[[argparse.Namespace], None]] = {
    "data": _data,
    "vae": _vae,
    "decoder": _decoder,
    "teacher": _teacher,
    "judge": _judge,
    "student": _student,
    "eval": _eval,
    "ship": _ship,
    "tiny-decoder": _tiny_decoder,
    "tiny-eval": _tiny_eval,
    "probe": _probe,
}
ORDER = ("data", "vae", "judge", "teacher", "decoder", "student", "eval", "ship", "tiny-decoder")


def _all(a: argparse.Namespace) -> None:
    for name in ORDER:
        STAGES[name](a)


STAGES["all"] = _all


def run(stage: str, args: argparse.Namespace) -> None:
    STAGES[stage](args)
