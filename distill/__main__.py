"""`python -m distill <stage>`: each stage reads the previous stages' outputs from --workdir
and resumes from its own checkpoint when rerun."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from distill import stages

log = logging.getLogger("distill")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__)
    parser.add_argument(
        "stage", choices=sorted(stages.STAGES), help="which stage to run ('all' runs them in order)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/distill"), help="checkpoints and caches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps for this stage (default per stage)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size for this stage (default per stage)"
    )
    parser.add_argument("--n", type=int, default=None, help="vae: latents to cache; student regress: targets")
    parser.add_argument(
        "--minutes", type=float, default=None, help="student: stop (and export) after this long"
    )
    parser.add_argument("--variant", default=None, help="student variant: vsd_kl, vsd, regress")
    parser.add_argument(
        "--init", default=None, help="student: start from 'teacher' or another variant's exported student"
    )
    parser.add_argument(
        "--reg-weight", type=float, default=None, help="student vsd/vsd_kl: DMD regression anchor weight"
    )
    parser.add_argument(
        "--fake-warmup",
        type=int,
        default=None,
        help="student vsd/vsd_kl: fake-score steps before the student moves",
    )
    parser.add_argument(
        "--fake-updates", type=int, default=None, help="student vsd/vsd_kl: fake-score steps per student step"
    )
    parser.add_argument(
        "--eval-prompts",
        type=int,
        default=None,
        help="eval: fewer held-out prompts than the split's (smoke runs)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="eval: 'test' (64 prompts x 4 seeds) makes the table; 'val' (256 x 2) is for choosing students",
    )
    parser.add_argument(
        "--pixel-weight", type=float, default=None, help="student: weight of the decoded-image regression"
    )
    parser.add_argument(
        "--edge-weight",
        type=float,
        default=None,
        help="student: weight the image regression up on the target's edges (0: plain MSE)",
    )
    parser.add_argument("--lr", type=float, default=None, help="student: peak learning rate")
    parser.add_argument(
        "--out", type=Path, default=None, help="ship (and all): the pipeline folder to write; required"
    )
    parser.add_argument(
        "--student-latents",
        type=int,
        default=None,
        help="tiny-decoder: also train on this many of the student's own one-pass latents (default 0)",
    )
    parser.add_argument(
        "--student-share",
        type=float,
        default=None,
        help="tiny-decoder: the share of each batch drawn from the student latents (default 0.5)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="tiny-eval: the pipeline folder (with vae_tiny/) to judge; tiny-decoder: the student to draw "
        "--student-latents from (default: the embedded model)",
    )
    parser.add_argument(
        "--judge-out", type=Path, default=None, help="ship: the judge file (default: <out>-judge.safetensors)"
    )
    args = parser.parse_args(argv)
    if args.stage in ("ship", "all") and args.out is None:
        parser.error(f"{args.stage} writes the model only where --out says, e.g. --out engine/default_model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stages.run(args.stage, args)


if __name__ == "__main__":
    main()
