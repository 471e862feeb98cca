"""Generator throughput on this machine: the nearest-neighbour generators and tiny random BLIP2 / SDXL.

The tiny checkpoints are the test suite's (``tests/tiny_models.py``: the real transformers/diffusers classes at
toy sizes), so these figures measure the generators' own overhead (prompting, batching, seeding, decoding),
not what a real BLIP2-OPT-2.7B or SDXL-base costs: that needs a GPU and the real weights
(``docs/scaling.md`` uses published figures for those). One warm-up batch runs first, untimed.

    python bench/actors_generators.py                  # 32 queries, n = 4 candidates
    python bench/actors_generators.py --queries 8 --n 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import measure, table, write_results  # noqa: E402
from rag4dmc.actors.generators import (  # noqa: E402
    Blip2TextGenerator,
    Example,
    NearestNeighbourImageGenerator,
    NearestNeighbourTextGenerator,
    SdxlImageGenerator,
)
from rag4dmc.actors.images import encode_image  # noqa: E402
from tests.tiny_models import CORPUS, TINY_IMAGE, save_tiny_blip2, save_tiny_sdxl  # noqa: E402

EXAMPLES_PER_QUERY = 8  # retrieved examples handed to each query (the job's retrieval.n_results default)
SDXL_STEPS = 2


def workload(n_queries: int, seed: int = 0) -> tuple[list[Image.Image], list[str], list[list[Example]]]:
    """Query images, query texts and retrieved examples (caption + image bytes), best first."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (TINY_IMAGE, TINY_IMAGE, 3), dtype=np.uint8))
              for _ in range(n_queries)]
    texts = [CORPUS[1 + i % (len(CORPUS) - 1)] for i in range(n_queries)]
    examples = [[Example(id=f"kb-{q}-{j}", text=CORPUS[1 + (q + j) % (len(CORPUS) - 1)],
                         image=encode_image(images[(q + j) % n_queries], "png"), score=1.0 - 0.05 * j)
                 for j in range(EXAMPLES_PER_QUERY)] for q in range(n_queries)]
    return images, texts, examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="candidates per query")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    images, texts, examples = workload(args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        blip2_path, sdxl_path = save_tiny_blip2(Path(tmp)), save_tiny_sdxl(Path(tmp))
        generators = [
            ("nn text", NearestNeighbourTextGenerator(), images),
            ("nn image", NearestNeighbourImageGenerator(), texts),
            ("tiny blip2", Blip2TextGenerator(str(blip2_path), device="cpu", max_new_tokens=8,
                                              batch_size=args.batch_size), images),
            ("tiny sdxl img2img", SdxlImageGenerator(str(sdxl_path), device="cpu", steps=SDXL_STEPS,
                                                     image_size=TINY_IMAGE, batch_size=args.batch_size), texts),
        ]
        rows = []
        for name, gen, queries in generators:
            gen.generate(queries[: args.batch_size], examples[: args.batch_size], args.n, seed=0)  # warm-up
            with measure() as m:
                out = gen.generate(queries, examples, args.n, seed=1)
            made = sum(len(c) for c in out)
            rows.append({"generator": name, "queries": args.queries, "candidates": made, "seconds": m.seconds,
                         "queries_per_s": args.queries / m.seconds, "candidates_per_s": made / m.seconds,
                         "peak_rss_gib": m.peak_rss_gib})
    payload = {"torch_threads": torch.get_num_threads(), "n": args.n, "batch_size": args.batch_size,
               "examples_per_query": EXAMPLES_PER_QUERY, "sdxl_steps": SDXL_STEPS, "image_size": TINY_IMAGE,
               "rows": rows}
    print(f"generators on cpu ({torch.get_num_threads()} torch threads), n = {args.n}, batch {args.batch_size}")
    print(table(rows, ["generator", "queries", "candidates", "seconds", "queries_per_s", "candidates_per_s",
                       "peak_rss_gib"]))
    print("written", write_results("actors_generators", payload))


if __name__ == "__main__":
    main()
