"""The decode stage of the embedded default model, full VAE vs its tiny decoder, side by side (not a test).

Loads the default model once (torch backend, CPU), then times `vae_decode` — the pipeline's own stage
timing — for both decoders on the same latents, interleaved so a noisy neighbour hits both alike, at
each batch size; prints a markdown table of medians and bests (ms) and the speed-up of each.

    python bench/tiny_decoder.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402
from engine.pipeline import load_pipeline  # noqa: E402
from engine.types import VAE_DECODE, Decoder, GenerationRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    pipe = load_pipeline(EngineConfig(threads=args.threads))
    if Decoder.TINY not in pipe.info.decoders:
        raise SystemExit("the default model has no vae_tiny/: run `python -m distill tiny-decoder --out ...`")
    print(
        "| batch | vae_decode full, median / best (ms) | vae_decode tiny, median / best (ms) | speed-up, "
        "median / best | whole batch full / tiny, median (ms) |"
    )
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        stage: dict[Decoder, list[float]] = {d: [] for d in Decoder}
        total: dict[Decoder, list[float]] = {d: [] for d in Decoder}
        for i in range(args.repeats + 2):
            for decoder in Decoder:
                requests = [
                    GenerationRequest("a red circle on a blue background", i * 8 + s, 64, 64, decoder)
                    for s in range(batch)
                ]
                timings = pipe.generate(requests).timings
                if i >= 2:  # two warm-up rounds
                    stage[decoder].append(timings[VAE_DECODE] * 1000)
                    total[decoder].append(sum(timings.values()) * 1000)
        full, tiny = (statistics.median(stage[d]) for d in (Decoder.FULL, Decoder.TINY))
        best_full, best_tiny = (min(stage[d]) for d in (Decoder.FULL, Decoder.TINY))
        whole_full, whole_tiny = (statistics.median(total[d]) for d in (Decoder.FULL, Decoder.TINY))
        print(
            f"| {batch} | {full:.2f} / {best_full:.2f} | {tiny:.2f} / {best_tiny:.2f} | "
            f"{full / tiny:.2f}x / {best_full / best_tiny:.2f}x | {whole_full:.1f} / {whole_tiny:.1f} |"
        )


if __name__ == "__main__":
    main()
