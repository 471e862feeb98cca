"""Lite encoder throughput on this machine: CPU preprocessing, the image tower, the text tower.

Three separately timed steps, as the pipeline runs them: decoding + ``resize_for_model`` of JPEG photos
(Ray's CPU tasks), ``encode_pixels`` on the preprocessed 224px arrays and ``encode_texts`` on captions (the
embedding actors). One warm-up batch of each runs first, untimed.

On CPU it then sweeps the image tower's runtime (torch eager, channels_last / ONNX Runtime), thread count (1, as
in a Ray actor given a fraction of a CPU, and every CPU) and images per forward (``LiteEncoder.micro_batch``),
each against the plain NCHW float32 torch forward: images/s and the least cosine to it (the embeddings must
stay within 0.999).

    python bench/actors_encoders.py                         # 256 images, 1000 captions
    python bench/actors_encoders.py --images 64 --texts 200 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import measure, table, write_results  # noqa: E402
from rag4dmc.actors.encoders import LITE_MEAN, LITE_STD, LiteEncoder, lite_image_tower  # noqa: E402
from rag4dmc.actors.images import encode_image, load_image, resize_for_model  # noqa: E402

MICRO_BATCHES = (1, 4, 8, 16, 64)  # images per forward in the CPU sweep
PHOTO_SIZE = (640, 480)  # source photos before preprocessing, as JPEG
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry")
SUBJECTS = ("a tabby cat", "two dogs", "a red bus", "an old man", "a small boat", "a bowl of fruit", "a rocket")
ACTIONS = ("sitting", "running", "parked", "waiting", "drifting", "resting", "standing")
PLACES = ("on a wooden table", "in a sunny park", "by the river at dusk", "in front of a brick wall",
          "under heavy snow", "next to a crowded market street full of people")


def jpeg_photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of PHOTO_SIZE: random crops of scikit-image's sample photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        out.append(encode_image(src.crop((x, y, x + cw, y + ch)).resize(PHOTO_SIZE), "jpeg"))
    return out


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` template captions of varied length."""
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}" for _ in range(n)]


def reference_embeddings(pixels: np.ndarray) -> np.ndarray:
    """The plain NCHW float32 torch forward of the tower, unit rows: what every fast path must reproduce."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return torch.nn.functional.normalize(lite_image_tower().eval()(x), dim=1).numpy()


def tower_sweep(pixels: np.ndarray, reference: np.ndarray, thread_counts: list[int]) -> list[dict]:
    """images/s and least cosine to ``reference`` per runtime x threads x images per forward (best of 2)."""
    rows, threads_before, omp_before = [], torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    for runtime in ("torch", "onnxruntime"):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # ONNX Runtime's session takes it when it is created
            enc = LiteEncoder(device="cpu", batch_size=len(pixels), cpu_runtime=runtime)
            for step in MICRO_BATCHES:
                enc.micro_batch = step
                out = enc.encode_pixels(pixels)  # warm-up
                seconds = []
                for _ in range(2):
                    with measure() as m:
                        out = enc.encode_pixels(pixels)
                    seconds.append(m.seconds)
                rows.append({"runtime": runtime, "threads": threads, "images_per_forward": step,
                             "images_per_s": len(pixels) / min(seconds),
                             "least_cosine": float((out * reference).sum(axis=1).min())})
                print(rows[-1], flush=True)
    torch.set_num_threads(threads_before)
    if omp_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp_before
    return rows


def fresh_process_loads() -> list[dict]:
    """Seconds a fresh process (as a new actor is) takes to import the encoder and load one tower, per runtime on
    CPU: the ONNX graphs cached (the first process on a machine exported them), or torch with timm / transformers."""
    rows = []
    for runtime in ("onnxruntime", "torch"):
        for tower in ("image", "text"):
            code = ("from rag4dmc.actors.encoders import LiteEncoder\n"
                    f"LiteEncoder(device='cpu', cpu_runtime={runtime!r}, towers=({tower!r},))\n")
            subprocess.run([sys.executable, "-c", code], check=True)  # the graphs exported, the files in the page cache
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            rows.append({"runtime": runtime, "tower": tower, "fresh_process_seconds": time.perf_counter() - started})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=LiteEncoder.RESOURCES.batch_size)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sweep-images", type=int, default=128, help="photos in the CPU runtime sweep (0: no sweep)")
    args = ap.parse_args()

    with measure() as m_load:
        enc = LiteEncoder(device=args.device, batch_size=args.batch_size)
    jpegs, texts = jpeg_photos(args.images), captions(args.texts)

    def preprocess(data: list[bytes]) -> np.ndarray:
        return np.stack([resize_for_model(load_image(b), enc.image_size) for b in data])

    enc.encode_pixels(preprocess(jpegs[: args.batch_size]))  # warm-up
    enc.encode_texts(texts[: args.batch_size])
    with measure() as m_pre:
        pixels = preprocess(jpegs)
    with measure() as m_img:
        enc.encode_pixels(pixels)
    with measure() as m_txt:
        enc.encode_texts(texts)

    steps = [("preprocess (decode + resize, 1 process)", args.images, m_pre),
             (f"encode_pixels ({enc.image_size}px)", args.images, m_img),
             ("encode_texts", args.texts, m_txt)]
    rows = [{"step": name, "items": n, "seconds": m.seconds, "items_per_s": n / m.seconds,
             "peak_rss_gib": m.peak_rss_gib} for name, n, m in steps]
    payload = {"encoder": enc.name, "device": str(enc.device), "torch_threads": torch.get_num_threads(),
               "image_runtime": "onnxruntime" if enc.onnx is not None else "torch",
               "text_runtime": "onnxruntime" if enc.text_onnx is not None else "torch",
               "batch_size": args.batch_size, "photo_size": PHOTO_SIZE, "load_seconds": m_load.seconds,
               "rows": rows}
    print(f"{enc.name} on {enc.device} ({torch.get_num_threads()} torch threads, image tower in "
          f"{payload['image_runtime']}, text tower in {payload['text_runtime']}), batch {args.batch_size}, loaded in {m_load.seconds:.1f} s")
    print(table(rows, ["step", "items", "seconds", "items_per_s", "peak_rss_gib"]))
    if enc.device.type == "cpu":
        payload["fresh_process_loads"] = fresh_process_loads()
        print(table(payload["fresh_process_loads"], ["runtime", "tower", "fresh_process_seconds"]))
    if enc.device.type == "cpu" and args.sweep_images:
        sample = preprocess(jpeg_photos(args.sweep_images, seed=1))
        counts = sorted({1, torch.get_num_threads()})
        payload["tower_sweep"] = tower_sweep(sample, reference_embeddings(sample), counts)
        print(table(payload["tower_sweep"], ["runtime", "threads", "images_per_forward", "images_per_s",
                                             "least_cosine"]))
    print("written", write_results("actors_encoders", payload))


if __name__ == "__main__":
    main()
