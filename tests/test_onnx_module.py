"""A torch module run by ONNX Runtime: the same outputs as torch at any batch size, exported once per weight files
(a second actor loads the cached graph without building the module), a new graph when the files or what is built
from them change, and the threads it was given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rag4dmc.actors.onnx_module as onnx_module
from rag4dmc.actors.onnx_module import OnnxModule


def small_convnet(seed: int) -> torch.nn.Module:
    """Conv, batch norm, depthwise conv, pooling, a linear head: the layer kinds of the lite image tower."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    with torch.no_grad():  # running statistics that are not the identity, so folding them is tested
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def exports(monkeypatch) -> list:
    """Every export that happens, recorded (the real one still runs)."""
    calls, real = [], onnx_module.export_onnx
    monkeypatch.setattr(onnx_module, "export_onnx", lambda *a: (calls.append(a[2]), real(*a)))
    return calls


def _weights(tmp_path, seed: int):
    """A weights file of ``small_convnet(seed)`` (its state dict, as a model's checkpoint holds it)."""
    path = tmp_path / f"convnet-{seed}.pt"
    torch.save(small_convnet(seed).state_dict(), path)
    return path


def _build(seed: int, built: list | None = None, size: int = 16):
    """``OnnxModule.cached``'s builder of ``small_convnet(seed)``, recording each build in ``built``."""
    def make():
        if built is not None:
            built.append(seed)
        return small_convnet(seed), (torch.zeros(2, 3, size, size),), ("x",), ({0: "batch"},)
    return make


def test_onnx_outputs_equal_torch_at_every_batch_size(tmp_path, exports):
    net = small_convnet(0)
    module = OnnxModule.cached([_weights(tmp_path, 0)], "convnet:16", _build(0), threads=1, cache_dir=tmp_path / "g")
    x = np.random.default_rng(0).normal(size=(7, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    for n in (1, 3, 7):  # the batch dimension is dynamic: not only the example's 2
        out = module(x[:n])
        assert out.dtype == np.float32 and out.shape == (n, 5)
        np.testing.assert_allclose(out, expected[:n], atol=1e-5)
    assert len(exports) == 1


def test_the_session_runs_on_the_cpus_ray_gave_the_actor_unless_told(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what Ray sets in an actor given 3 CPUs
    weights, cache = [_weights(tmp_path, 0)], tmp_path / "graphs"
    default = OnnxModule.cached(weights, "convnet:16", _build(0), cache_dir=cache)
    given = OnnxModule.cached(weights, "convnet:16", _build(0), threads=1, cache_dir=cache)
    assert default.session.get_session_options().intra_op_num_threads == 3
    assert given.session.get_session_options().intra_op_num_threads == 1


def test_a_graph_keyed_by_its_weight_files_is_built_only_when_this_machine_has_none(tmp_path, exports):
    """``OnnxModule.cached`` finds a graph by the content of the files it is made from: the module is built (and
    torch used) and exported once; the same files load the cached graph without building anything; other content,
    or another input size (``spec``), a new graph. The batch is not part of the key: it is dynamic."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(_weights(tmp_path, 0).read_bytes())
    built: list[int] = []
    cache = tmp_path / "graphs"
    first = OnnxModule.cached([weights], "convnet:16", _build(0, built), threads=1, cache_dir=cache)
    again = OnnxModule.cached([weights], "convnet:16", _build(1, built), threads=1, cache_dir=cache)
    assert built == [0] and again.path == first.path and exports == [first.path]
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(again(x), small_convnet(0)(torch.from_numpy(x)).numpy(), atol=1e-5)
    weights.write_bytes(_weights(tmp_path, 1).read_bytes())  # other weights in the same file
    other = OnnxModule.cached([weights], "convnet:16", _build(1, built), threads=1, cache_dir=cache)
    assert built == [0, 1] and other.path != first.path and exports == [first.path, other.path]
    assert not np.allclose(first(x), other(x))
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.path.name, other.path.name])  # no partials
    bigger = OnnxModule.cached([weights], "convnet:32", _build(1, built, size=32), cache_dir=cache)
    assert bigger.path != other.path and built == [0, 1, 1]
