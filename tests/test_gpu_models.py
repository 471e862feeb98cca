"""The full-size BLIP2 and SDXL of bench/gpu.py: the published architectures, and they run through our generators."""

from __future__ import annotations

import json

import pytest

from bench import gpu
from bench.gpu_models import FULL, PUBLISHED_PARAMS, REDUCED, parameter_counts


def test_full_size_configurations_have_the_published_checkpoints_parameter_counts():
    # Built on the meta device: no memory. Any wrong width, depth, head size or vocabulary changes a count.
    assert parameter_counts(FULL) == PUBLISHED_PARAMS


def test_reduced_depth_keeps_every_width_and_drops_only_layers():
    full, reduced = parameter_counts(FULL), parameter_counts(REDUCED)
    assert all(0 < reduced[name] < full[name] for name in full)


@pytest.mark.slow
def test_bench_gpu_runs_both_generators_at_reduced_depth_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--depth", "reduced", "--device", "cpu", "--only", "blip2,sdxl", "--queries", "2", "--n", "2",
                       "--batch-size", "2", "--sdxl-batch-size", "2", "--steps", "2", "--image-size", "64",
                       "--max-new-tokens", "4", "--anchor-images", "1", "--anchor-size", "64", "--work",
                       str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    blip2, sdxl = result["parts"]["blip2"], result["parts"]["sdxl"]
    assert "error" not in blip2, blip2.get("traceback")
    assert "error" not in sdxl, sdxl.get("traceback")
    assert blip2["queries"] == 2 and blip2["queries_without_caption"] == 0 and 2 <= blip2["captions"] <= 4
    assert sdxl["images"] == 2 * 2 and sdxl["text2img_anchor"]["images"] == 1
