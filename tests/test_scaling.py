"""Pools sized from the cluster (rag4dmc.pipeline.job.scaling): the slowest stage gets the most actors, nothing is given past
what the cluster holds or can get, a user's max_actors wins, and the usage figures add up (rag4dmc.pipeline.job.pool_usage)."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest

from rag4dmc.actors.generators import Blip2TextGenerator, SdxlImageGenerator
from rag4dmc.actors.resources import Resources
from rag4dmc.pipeline.config import EncoderConfig, JobConfig, StageResources
from rag4dmc.pipeline.job.pool_usage import Report, bounding_pool, peak, pool_usage
from rag4dmc.pipeline.job.scaling import Pool, capacity_of, device_share, size_pools, stage_time, task_rows
from tests.conftest import REPO_ROOT

GIB = 1024**3
CLIP = Resources(num_cpus=1.0, num_gpus=0.25, memory_gb=8.0, seconds_per_row=0.0016)


GPU_JOB = JobConfig.model_validate({"generator": {"text_backend": "blip2", "image_backend": "sdxl",
                                                  "blip2_model": "b", "sdxl_model": "s"}})


def _gpu_manifest() -> dict:
    """A one-shard KB's manifest, built with the open_clip encoder (768-d): the GPU path's chains."""
    from tests.test_job import _manifest

    manifest = _manifest(1)
    manifest["config"]["encoder"] = EncoderConfig(backend="open_clip").model_dump(mode="json")
    manifest["image_dim"] = manifest["text_dim"] = 768
    return manifest


def gpu_nodes(n: int, gpus: int = 2, cpus: int = 8, memory_gb: float = 64.0) -> list[dict]:
    return [{"CPU": cpus, "GPU": gpus, "memory": memory_gb * GIB} for _ in range(n)]


def published_pools(i2t_share: float = 0.5) -> dict[str, Pool]:
    """The GPU path's pools with the published per-row costs (docs/scaling.md)."""
    return {"embed:i2t": Pool(CLIP, i2t_share), "embed:t2i": Pool(CLIP, 1 - i2t_share),
            "generate:i2t": Pool(Blip2TextGenerator.RESOURCES, i2t_share),
            "generate:t2i": Pool(SdxlImageGenerator.RESOURCES, 1 - i2t_share)}


def max_time(pools, sizes) -> float:
    return max(stage_time(pools[n].resources, pools[n].row_share, sizes[n]) for n in pools)


@pytest.mark.parametrize("gpus", [4, 12, 16, 32])
def test_gpu_pools_fill_the_cluster_and_no_move_of_one_actor_would_make_the_slowest_stage_faster(gpus):
    pools = published_pools()
    sized = size_pools(pools, capacity_of(gpu_nodes(gpus // 2)))
    sizes = {n: r.max_actors for n, r in sized.items()}
    used = sum(sized[n].num_gpus * k for n, k in sizes.items())
    assert used <= gpus + 1e-9
    assert sizes["generate:i2t"] + sizes["generate:t2i"] == gpus  # a generator on every GPU, never two on one
    assert max(sizes, key=sizes.get) == "generate:t2i"  # SDXL, 2.14 s per row, gets the most actors
    best = max_time(pools, sizes)
    for a, b in itertools.permutations(pools, 2):  # take an actor from a, give what it frees to b
        if sizes[a] <= 1:
            continue
        freed = pools[a].resources.num_gpus
        extra = int(freed // pools[b].resources.num_gpus + 1e-9)
        if extra:
            moved = dict(sizes, **{a: sizes[a] - 1, b: sizes[b] + extra})
            assert max_time(pools, moved) >= best - 1e-12, (a, b)


def test_two_three_quarter_gpu_actors_never_share_a_gpu_and_embedders_fill_the_quarters_left():
    pools = published_pools()
    sized = size_pools(pools, capacity_of(gpu_nodes(2)))  # 4 GPUs
    generators = sized["generate:i2t"].max_actors + sized["generate:t2i"].max_actors
    assert generators == 4  # 5 x 0.75 = 3.75 would "fit" 4 GPUs as a sum, but Ray puts a fraction on one GPU
    assert sized["embed:i2t"].max_actors + sized["embed:t2i"].max_actors <= 4  # one quarter left per GPU


def test_the_direction_with_more_rows_gets_more_of_the_gpus():
    even = size_pools(published_pools(0.5), capacity_of(gpu_nodes(8)))
    mostly_captions = size_pools(published_pools(0.95), capacity_of(gpu_nodes(8)))
    assert mostly_captions["generate:i2t"].max_actors > even["generate:i2t"].max_actors
    assert mostly_captions["generate:t2i"].max_actors < even["generate:t2i"].max_actors


def test_gpu_workers_the_autoscaler_may_add_count_and_gpu_pools_start_at_their_size():
    head = [{"CPU": 4, "memory": 16 * GIB}]
    capacity = capacity_of(head, [({"CPU": 8, "GPU": 2, "memory": 64 * GIB}, 4)])  # GPU workers from zero
    assert (capacity.gpus_now, capacity.gpus, capacity.nodes, capacity.autoscaling) == (0, 8, 5, True)
    sized = size_pools(published_pools(), capacity)
    assert sized["generate:i2t"].max_actors + sized["generate:t2i"].max_actors == 8
    for r in sized.values():
        assert r.initial_actors == r.max_actors  # the whole demand in the autoscaler's first cycle


def test_a_user_set_max_actors_wins_and_its_gpus_are_not_given_twice():
    pools = published_pools()
    pools["generate:t2i"] = Pool(SdxlImageGenerator.RESOURCES.with_overrides(StageResources(max_actors=2)), 0.5,
                                 fixed=True)
    sized = size_pools(pools, capacity_of(gpu_nodes(4)))
    assert sized["generate:t2i"].max_actors == 2
    assert sum(r.num_gpus * r.max_actors for r in sized.values()) <= 8 + 1e-9


def test_cpu_pools_grow_with_the_cluster_but_stay_at_one_actor_on_two_cpus():
    lite = Resources(num_cpus=0.25, memory_gb=2.0, seconds_per_row=0.023)
    retrieve = Resources(num_cpus=0.125, memory_gb=2.0, seconds_per_row=0.008)
    pools = {"embed": Pool(lite), "retrieve": Pool(retrieve)}
    small = size_pools(pools, capacity_of([{"CPU": 2, "memory": 24 * GIB}]), cpu_reserved=1.125)
    assert {n: r.max_actors for n, r in small.items()} == {"embed": 1, "retrieve": 1}
    three_nodes = capacity_of([{"CPU": 2, "memory": 8 * GIB}] + [{"CPU": 4, "memory": 8 * GIB}] * 2)
    big = size_pools(pools, three_nodes, cpu_reserved=1.125)
    assert big["embed"].max_actors > big["retrieve"].max_actors >= 1
    # a CPU actor counts as at least one CPU, whatever fraction it reserves: one thread each
    assert sum(device_share(r) * r.max_actors for r in big.values()) <= 10 - 1.125
    assert big["embed"].initial_actors == 1  # CPU pools start small and grow on Ray Data's utilisation


def test_memory_bounds_a_pool_the_devices_would_allow():
    heavy = Resources(num_cpus=1.0, num_gpus=0.25, memory_gb=30.0, seconds_per_row=1.0)
    sized = size_pools({"big": Pool(heavy)}, capacity_of(gpu_nodes(2, gpus=4, memory_gb=64.0)))
    assert sized["big"].max_actors == 4  # 8 GPUs hold 32 quarter-GPU actors; 128 GiB hold 4 of 30 GiB


def test_a_pool_slower_than_task_seconds_a_block_takes_tasks_of_whole_batches_within_that_time():
    sdxl, blip2 = SdxlImageGenerator.RESOURCES, Blip2TextGenerator.RESOURCES  # 2.14 s/row, batch 4; 0.25, batch 16
    assert task_rows(sdxl, 256, 30.0) == 12  # 14 rows fit in 30 s: three batches of 4
    assert task_rows(blip2, 256, 30.0) == 112  # 120 fit: seven batches of 16
    assert task_rows(CLIP, 256, 30.0) == 256  # a block is 0.4 s: left whole
    assert task_rows(sdxl, 256, 1.0) == 4  # one row is longer than the budget: one batch, never less
    assert task_rows(sdxl, 8, 30.0) == 8  # never more than a block
    assert task_rows(Resources(batch_size=64, seconds_per_row=0.25), 256, 30.0) == 64  # 120 fit: one CPU batch


def test_the_plan_holds_back_a_block_per_merge_where_a_pool_splits_blocks():
    from rag4dmc.pipeline.job.mapper import flow_floor, partial_rows

    cfg = JobConfig()
    cheap = {"embed:i2t": CLIP}
    assert partial_rows(cfg, cheap, 2) == [64, 256, 256, 256]  # a batch, and the three branches' read splits
    split = {"embed:i2t": CLIP, "generate:t2i": SdxlImageGenerator.RESOURCES}
    assert partial_rows(cfg, split, 2) == [64, 4, 256, 256, 256, 256, 256]  # and a merge per direction
    assert flow_floor(cfg, split, 2) == 64 + 4 + 5 * 256


def test_a_measured_cost_set_for_one_direction_s_pool_resizes_the_pools_and_keeps_the_stage_s_other_settings():
    from rag4dmc.pipeline.job.mapper import DIRECTIONS, actor_pools, direction_stages, plan_resources

    with mock.patch("rag4dmc.actors.encoders.describe_encoder", return_value={"image_dim": 768, "text_dim": 768}), \
            mock.patch("rag4dmc.actors.encoders.encoder_image_size", return_value=224):
        chains = {task: direction_stages(task, GPU_JOB, "kb", _gpu_manifest(), None) for task, _ in DIRECTIONS}
    declared = plan_resources(GPU_JOB, chains, True, capacity_of(gpu_nodes(6)))
    assert declared["generate:t2i"].max_actors > declared["generate:i2t"].max_actors  # SDXL: 2.14 s/row, BLIP2 0.25
    # a run measured BLIP2 at 4 s/row (say, long captions): it now needs the most cards
    measured = GPU_JOB.model_copy(update={"resources": {"generate": StageResources(memory_gb=12.0),
                                                        "generate:i2t": StageResources(seconds_per_row=4.0)}})
    pools = actor_pools(measured, chains, True)
    assert pools["generate:i2t"].resources.seconds_per_row == 4.0
    assert pools["generate:i2t"].resources.memory_gb == pools["generate:t2i"].resources.memory_gb == 12.0
    assert pools["generate:t2i"].resources.seconds_per_row == SdxlImageGenerator.RESOURCES.seconds_per_row
    sized = plan_resources(measured, chains, True, capacity_of(gpu_nodes(6)))
    assert sized["generate:i2t"].max_actors > sized["generate:t2i"].max_actors


def test_the_job_plan_sizes_gpu_pools_from_the_cluster_with_the_embedder_sharing_a_gpu():
    from rag4dmc.pipeline.job.mapper import DIRECTIONS, direction_stages, plan_resources

    with mock.patch("rag4dmc.actors.encoders.describe_encoder", return_value={"image_dim": 768, "text_dim": 768}), \
            mock.patch("rag4dmc.actors.encoders.encoder_image_size", return_value=224):
        chains = {task: direction_stages(task, GPU_JOB, "kb", _gpu_manifest(), None) for task, _ in DIRECTIONS}
    pools = plan_resources(GPU_JOB, chains, True, capacity_of(gpu_nodes(6)))  # 12 GPUs, as ray_cluster.yaml allows
    assert pools["embed:i2t"].num_gpus < 1
    assert pools["generate:i2t"].max_actors + pools["generate:t2i"].max_actors == 12
    assert pools["generate:t2i"].max_actors > 4 * pools["generate:i2t"].max_actors


def test_usage_counts_peak_actors_per_node_and_busy_share():
    reports = [Report("embed", "a1", "node-1", 0.0, 10.0, busy=5.0, batches=3, rows=300),
               Report("embed", "a2", "node-2", 5.0, 10.0, busy=5.0, batches=2, rows=200),
               Report("embed", "a3", "node-2", 11.0, 12.0, busy=0.0),
               Report("generate", "g1", "node-1", 0.0, 10.0, busy=9.0, batches=9)]
    usage = pool_usage(reports, origin=0.0)
    assert usage["embed"]["peak_actors"] == 2 and usage["embed"]["actors"] == 3
    assert usage["embed"]["actors_per_node"] == {"node-1": 1, "node-2": 2}
    assert usage["embed"]["busy_share"] == pytest.approx(10.0 / 16.0, abs=1e-3)
    assert usage["embed"]["actors_over_time"] == [[0.0, 1], [5.0, 2], [10.0, 0], [11.0, 1], [12.0, 0]]
    assert usage["embed"]["rows"] == 500 and usage["embed"]["seconds_per_row"] == 10.0 / 500
    assert usage["generate"]["seconds_per_row"] is None  # no rows counted: no cost to report
    assert bounding_pool(usage) == "generate"
    assert peak([(0, 1), (1, 2)]) == 1  # one ends as the next starts


def test_read_capacity_counts_what_the_autoscaler_config_may_still_add(monkeypatch):
    import ray
    from ray.core.generated import autoscaler_pb2

    from rag4dmc.pipeline.job.scaling import read_capacity

    gpu_worker = {"CPU": 8, "GPU": 2, "memory": 64 * GIB}
    alive = [{"Alive": True, "Resources": {"CPU": 4.0, "memory": 16.0 * GIB}},
             {"Alive": True, "Resources": gpu_worker}, {"Alive": False, "Resources": gpu_worker}]
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu_worker", min_count=0, max_count=3)
    group.resources.update(gpu_worker)
    unlimited = config.node_group_configs.add(name="cpu_worker", min_count=0, max_count=-1)
    unlimited.resources.update({"CPU": 16})
    monkeypatch.setattr(ray, "nodes", lambda: alive)
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    capacity = read_capacity()
    # one GPU worker alive of at most 3: two more may come; the group without a limit adds nothing it can promise
    assert (capacity.nodes_now, capacity.nodes, capacity.gpus_now, capacity.gpus) == (2, 4, 2.0, 6.0)
    assert capacity.cpus == 4 + 3 * 8
    config.max_resources.update({"GPU": 4})
    assert read_capacity().gpus == 4.0


def test_the_shipped_cluster_config_before_any_worker_joins_gives_every_gpu_a_generator(monkeypatch):
    """Open-source Ray publishes no cluster config for `ray up` clusters: the job reads the autoscaler's own file. On
    ray_cluster.yaml's head alone (16 CPUs), the 12 g5.2xlarge it may add count: 10 SDXL and 2 BLIP2 actors."""
    import ray
    import yaml

    from rag4dmc.pipeline.job import scaling
    from rag4dmc.pipeline.job.mapper import DIRECTIONS, direction_stages, plan_resources

    config = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    groups, worker_limit = scaling.groups_of_config(config)
    assert [(g.name, g.resources["GPU"] if "GPU" in g.resources else 0, g.max_count) for g in groups] == [
        ("gpu_worker", 1.0, 12), ("cpu_worker", 0, 4)]  # the head type adds nothing
    assert worker_limit == 16
    head = {"CPU": 16.0, "memory": 44.0 * GIB, "node:__internal_head__": 1.0}  # a cpu_worker's shape, but the head
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": head}])
    monkeypatch.setattr(scaling, "published_groups", lambda: ([], {}))
    monkeypatch.setattr(scaling, "config_file_groups", lambda: (groups, worker_limit))
    capacity = scaling.read_capacity()
    assert (capacity.nodes_now, capacity.nodes, capacity.gpus_now, capacity.gpus) == (1, 17, 0.0, 12.0)
    with mock.patch("rag4dmc.actors.encoders.describe_encoder", return_value={"image_dim": 768, "text_dim": 768}), \
            mock.patch("rag4dmc.actors.encoders.encoder_image_size", return_value=224):
        chains = {task: direction_stages(task, GPU_JOB, "kb", _gpu_manifest(), None) for task, _ in DIRECTIONS}
    pools = plan_resources(GPU_JOB, chains, True, capacity)
    assert (pools["generate:t2i"].max_actors, pools["generate:i2t"].max_actors) == (10, 2)
    assert pools["generate:t2i"].initial_actors == 10  # the whole demand at once: the autoscaler starts the GPUs


def test_the_autoscaler_config_is_the_one_this_cluster_s_monitor_was_started_with(tmp_path):
    from rag4dmc.pipeline.job.scaling import autoscaling_config_path

    def process(pid: int, *args: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")

    process(10, "python", "monitor.py", "--gcs-address=10.0.0.1:6379", "--autoscaling-config=/other/cluster.yaml")
    process(11, "python", "monitor.py", "--gcs-address=10.0.0.2:6379", "--autoscaling-config", "/this/cluster.yaml")
    process(12, "python", "-m", "pytest")
    (tmp_path / "self").mkdir()  # not a process
    assert autoscaling_config_path("10.0.0.2:6379", proc=str(tmp_path)) == "/this/cluster.yaml"
    assert autoscaling_config_path("10.0.0.1:6379", proc=str(tmp_path)) == "/other/cluster.yaml"


def test_the_cluster_wide_worker_limit_goes_to_the_gpu_groups_first():
    from rag4dmc.pipeline.job.scaling import cap_workers

    cpu, gpu = {"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}
    assert cap_workers([(cpu, 4), (gpu, 12)], 14) == [(cpu, 2), (gpu, 12)]
    assert cap_workers([(cpu, 4), (gpu, 12)], 10) == [(cpu, 0), (gpu, 10)]
    assert cap_workers([(cpu, 4), (gpu, 12)], 20) == [(cpu, 4), (gpu, 12)]
