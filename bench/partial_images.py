"""What OpenAI-style partial images would cost: each earlier step's x0 prediction decoded besides the final image.

TiUE makes all T noise predictions in one pass, so the T-1 earlier x0 predictions exist at no denoising
cost; what they add is decoding. Times the pipeline's batch (`generate`) side by side with the same batch
plus a decode of T-1 more latents per image, on the default model (torch, CPU), for each decoder:

    python bench/partial_images.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.pipeline import load_pipeline  # noqa: E402
from engine.types import Decoder, GenerationRequest  # noqa: E402


def median_s(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    pipe = load_pipeline(EngineConfig(threads=args.threads))
    steps, size = pipe.info.steps, pipe.info.default_size
    latent = size // pipe.vae_scale
    print(f"| decoder | batch | generate (ms) | + {steps - 1} partials decoded (ms) | ratio |")
    print("|---|---|---|---|---|")
    for decoder in pipe.info.decoders:
        scale, shift = pipe.latent_scaling[decoder]
        for batch in (int(b) for b in args.batches.split(",")):
            requests = [
                GenerationRequest("a red circle on a blue square", s, size, size, decoder)
                for s in range(batch)
            ]
            partials = torch.randn(batch * (steps - 1), pipe.latent_channels, latent, latent) / scale + shift

            def plain(requests: list[GenerationRequest] = requests) -> None:
                pipe.generate(requests)

            def with_partials(
                requests: list[GenerationRequest] = requests,
                partials: torch.Tensor = partials,
                decoder: Decoder = decoder,
            ) -> None:
                pipe.generate(requests)
                with torch.inference_mode():
                    pipe.backend.decode(partials, decoder)

            plain()
            with_partials()
            base, more = median_s(plain, args.repeats), median_s(with_partials, args.repeats)
            print(f"| {decoder.value} | {batch} | {base * 1e3:.1f} | {more * 1e3:.1f} | {more / base:.2f} |")


if __name__ == "__main__":
    main()
