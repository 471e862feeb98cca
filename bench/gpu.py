"""GPU cost of the job's models at their published sizes (random weights), through the project's own classes.

BLIP2-OPT-2.7b and SDXL base 1.0 are built from their public configurations (``bench/gpu_models.py``), saved where
the generators load checkpoints from, and loaded by ``Blip2TextGenerator`` / ``SdxlImageGenerator`` with the
job's defaults (``GeneratorConfig``: n candidates, 30 tokens or 30 steps, img2img strength 0.6, fp16, SDPA). Beside
them: NIQE through the job's ``NiqeScorer`` on the GPU, and open_clip ViT-L/14's towers through ``OpenClipEncoder``.
Each part reports its throughput and peak GPU memory; one that fails (a package missing there) records its
error and the rest go on. Everything lands in one JSON file.

On the device machine (one prepared command; wheels in .whl, see ``bench/gpu_wheels.sh``):

    python bench/gpu.py --out $OUT/gpu.json                         # full size, under 8 minutes on an H200
    python bench/gpu.py --out $OUT/gpu.json --only sdxl --compile   # and the UNet under torch.compile

Here, on CPU, at reduced depth (one layer per stack, published widths) and toy settings, as the test suite does:

    python bench/gpu.py --depth reduced --device cpu --queries 2 --n 2 --steps 2 --image-size 64 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_models import FULL, REDUCED, Depth, save_blip2, save_sdxl  # noqa: E402
from rag4dmc.actors.generators import Blip2TextGenerator, Example, SdxlImageGenerator, torch_dtype  # noqa: E402
from rag4dmc.actors.images import encode_image  # noqa: E402
from rag4dmc.pipeline.config import GeneratorConfig  # noqa: E402

JOB = GeneratorConfig()  # the job's generation defaults: what a completion run pays per row
ANCHOR_SIZE = 1024  # SDXL's native resolution: the published anchor is 2.54 s/image at 30 steps on an A100
CLIP_BATCH = 256  # OpenClipEncoder's gpu_batch_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device, out: dict, key: str = "seconds") -> Iterator[None]:
    """Wall seconds of the block (device work finished) and the peak GPU memory it reached, into ``out``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    out[key] = round(time.perf_counter() - start, 3)
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def workload(n_queries: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str], list[list[Example]]]:
    """Query images, prompts and one retrieved example each (caption and image bytes), as the job hands them over."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 255, size, dtype=np.float32)
    images = []
    for _ in range(n_queries):  # smooth colour fields with noise: decodable, textured (NIQE is defined on them)
        base = rng.uniform(0.3, 1.0, 3) * (grid[:, None, None] + grid[None, :, None]) / 2
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)))
    prompts = [f"a photograph of a {w} on a table by the window, soft light, detailed"
               for w in ("red bus", "bowl of fruit", "sleeping cat", "wooden chair")]
    texts = [prompts[i % len(prompts)] for i in range(n_queries)]
    examples = [[Example(id=f"kb-{q}", text=texts[(q + 1) % n_queries], image=encode_image(images[(q + 1) % n_queries]),
                         score=0.9)] for q in range(n_queries)]
    return images, texts, examples


def run_blip2(args, device: torch.device, folder: Path, depth: Depth) -> dict:
    out: dict = {"model": "BLIP2-OPT-2.7b" + ("" if depth.full else " (reduced depth)"), "n": args.n,
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "precision": args.precision}
    with timed(device, out, "build_s"):
        path = save_blip2(folder, depth, device=str(device), dtype=torch_dtype(device, args.precision),
                          min_new_tokens=args.max_new_tokens)
    with timed(device, out, "load_s"):
        gen = Blip2TextGenerator(str(path), device=str(device), precision=args.precision,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    images, _, examples = workload(args.queries, 224)
    gen.generate(images[: args.batch_size], examples[: args.batch_size], args.n, seed=0)  # warm-up
    with timed(device, out):
        captions = gen.generate(images, examples, args.n, seed=1)
    made = sum(len(c) for c in captions)
    out.update(queries=args.queries, captions=made, queries_without_caption=sum(not c for c in captions),
               captions_per_s=round(made / out["seconds"], 2),
               queries_per_s=round(args.queries / out["seconds"], 3))
    del gen
    return out


def run_sdxl(args, device: torch.device, folder: Path, depth: Depth) -> dict:
    out: dict = {"model": "SDXL base 1.0" + ("" if depth.full else " (reduced depth)"), "n": args.n,
                 "steps": args.steps, "strength": JOB.strength, "image_size": args.image_size,
                 "batch_size": args.sdxl_batch_size, "precision": args.precision}
    with timed(device, out, "build_s"):
        path = save_sdxl(folder, depth, device=str(device), dtype=torch_dtype(device, args.precision))
    with timed(device, out, "load_s"):
        gen = SdxlImageGenerator(str(path), device=str(device), precision=args.precision, mode="img2img",
                                 strength=JOB.strength, steps=args.steps, image_size=args.image_size,
                                 batch_size=args.sdxl_batch_size)
    _, texts, examples = workload(args.queries, args.image_size)
    gen.generate(texts[:1], examples[:1], 1, seed=0)  # warm-up
    with timed(device, out):
        images = gen.generate(texts, examples, args.n, seed=1)
    made = sum(len(c) for c in images)
    out.update(queries=args.queries, images=made, images_per_s=round(made / out["seconds"], 3),
               unet_steps_per_image=int(args.steps * JOB.strength))
    if args.compile:  # the same batches with the UNet under torch.compile (the first call pays the compilation)
        compiled: dict = {}
        gen.pipe.unet = torch.compile(gen.pipe.unet)
        with timed(device, compiled, "compile_s"):
            gen.generate(texts[:1], examples[:1], 1, seed=0)
        with timed(device, compiled):
            gen.generate(texts, examples, args.n, seed=1)
        compiled["images_per_s"] = round(made / compiled["seconds"], 3)
        out["compiled_unet"] = compiled
    del gen
    if args.anchor_images:  # text2img at SDXL's own resolution, n = 1: how the published anchor is measured
        anchor: dict = {"image_size": args.anchor_size, "steps": args.steps, "images": args.anchor_images}
        gen = SdxlImageGenerator(str(path), device=str(device), precision=args.precision, mode="text2img",
                                 steps=args.steps, image_size=args.anchor_size, batch_size=1)
        gen.generate(texts[:1], examples[:1], 1, seed=0)  # warm-up
        with timed(device, anchor):
            gen.generate(texts[: args.anchor_images], examples[: args.anchor_images], 1, seed=1)
        anchor["s_per_image"] = round(anchor["seconds"] / args.anchor_images, 3)
        out["text2img_anchor"] = anchor
        del gen
    return out


def run_niqe(args, device: torch.device, folder: Path, depth: Depth) -> dict:
    from rag4dmc.actors.niqe import NiqeScorer

    out: dict = {"images": args.niqe_images, "image_size": JOB.image_size}
    scorer = NiqeScorer(device=str(device))
    images, _, _ = workload(args.niqe_images, JOB.image_size)
    scorer.score(images[0])  # warm-up
    with timed(device, out):
        scores = [scorer.score(img) for img in images]
    out.update(images_per_s=round(len(images) / out["seconds"], 2), undefined=int(np.isnan(scores).sum()))
    return out


def run_clip(args, device: torch.device, folder: Path, depth: Depth) -> dict:
    from rag4dmc.actors.encoders import OpenClipEncoder

    out: dict = {"model": "open_clip ViT-L-14 (random weights)", "batch_size": args.clip_batch,
                 "precision": args.precision}
    enc = OpenClipEncoder("ViT-L-14", pretrained=None, device=str(device), precision=args.precision,
                          batch_size=args.clip_batch)
    images, texts, _ = workload(args.clip_batch, enc.image_size)
    pixels = np.stack([np.asarray(img, np.uint8) for img in images])
    enc.encode_pixels(pixels[:8])
    with timed(device, out, "image_s"):
        for _ in range(args.clip_rounds):
            enc.encode_pixels(pixels)
    with timed(device, out, "text_s"):
        for _ in range(args.clip_rounds):
            enc.encode_texts(texts)
    n = args.clip_batch * args.clip_rounds
    out.update(images_per_s=round(n / out["image_s"], 1), texts_per_s=round(n / out["text_s"], 1))
    return out


PARTS: dict[str, Callable[..., dict]] = {"blip2": run_blip2, "sdxl": run_sdxl, "niqe": run_niqe, "clip": run_clip}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "sdpa": hasattr(torch.nn.functional,
                                                                               "scaled_dot_product_attention")}
    for name in ("transformers", "diffusers", "open_clip", "pyiqa", "faiss"):
        try:
            env[name] = getattr(__import__(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a missing package is a finding, not a failure
            env[name] = f"missing: {type(exc).__name__}"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu.json")
    ap.add_argument("--depth", choices=("full", "reduced"), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", type=lambda s: s.split(","), default=list(PARTS))
    ap.add_argument("--precision", default=JOB.precision)
    ap.add_argument("--queries", type=int, default=32, help="queries per generator (after one warm-up batch)")
    ap.add_argument("--n", type=int, default=JOB.n_candidates, help="candidates per query")
    ap.add_argument("--batch-size", type=int, default=JOB.batch_size, help="BLIP2 queries per generate call")
    ap.add_argument("--sdxl-batch-size", type=int, default=SdxlImageGenerator.RESOURCES.gpu_batch_size)
    ap.add_argument("--max-new-tokens", type=int, default=JOB.max_new_tokens)
    ap.add_argument("--steps", type=int, default=JOB.steps)
    ap.add_argument("--image-size", type=int, default=JOB.image_size)
    ap.add_argument("--compile", action="store_true", help="SDXL: time the UNet under torch.compile as well")
    ap.add_argument("--anchor-images", type=int, default=4, help="SDXL text2img images at --anchor-size (0: skip)")
    ap.add_argument("--anchor-size", type=int, default=ANCHOR_SIZE)
    ap.add_argument("--niqe-images", type=int, default=64)
    ap.add_argument("--clip-batch", type=int, default=CLIP_BATCH)
    ap.add_argument("--clip-rounds", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                    help="where the random checkpoints are written and read back (a RAM disk where there is one)")
    args = ap.parse_args(argv)
    device, depth = torch.device(args.device), FULL if args.depth == "full" else REDUCED
    result: dict = {"environment": environment(device), "depth": args.depth, "parts": {}}
    for name in args.only:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            try:
                result["parts"][name] = PARTS[name](args, device, Path(tmp), depth)
            except Exception as exc:  # noqa: BLE001 - report the part's failure and measure the rest
                result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                         "traceback": traceback.format_exc()[-4000:]}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(name, json.dumps(result["parts"][name])[:1000], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("written", args.out)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
