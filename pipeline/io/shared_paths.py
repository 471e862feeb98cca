"""Local paths on a multi-node cluster: used only where every node sees them, checked before anything starts.

The job's reads, actors and commits run on any node, so a local ``--data``, ``--kb`` or ``--out`` works only on a
mount that every node shares (NFS, Lustre, a single machine). :func:`check_local_paths` asks each node alive, with
a zero-CPU task pinned to it, whether it sees each local path; a node that does not is an error naming the path and
the node, before any actor starts. Nodes an autoscaler adds later cannot be asked, so a local path on an
autoscaling cluster is accepted with a warning that those nodes must mount it too.
"""

from __future__ import annotations

import logging
import os

from rag4dmc.pipeline.config import ConfigError
from rag4dmc.pipeline.io.storage import is_remote

log = logging.getLogger(__name__)


class PathNotShared(ConfigError):
    """A local path that some node of the cluster does not see."""


def _sees(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def check_local_paths(paths: dict[str, str], autoscaling: bool = False, timeout_s: float = 120.0) -> None:
    """Refuse a local path (``{flag: path}``; each must exist on the driver) that a node alive does not see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {flag: os.path.abspath(p) for flag, p in paths.items() if p and not is_remote(p)}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not local or (len(nodes) < 2 and not autoscaling):
        return
    probe = ray.remote(num_cpus=0)(_sees)
    answers = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(list(local.values())) for n in nodes}
    for node in nodes:
        seen = ray.get(answers[node["NodeID"]], timeout=timeout_s)
        for (flag, path), ok in zip(local.items(), seen):
            if not ok:
                raise PathNotShared(
                    f"{flag} {path} is a local path that node {node['NodeID'][:12]} ({node['NodeManagerAddress']}) "
                    "does not see: on a multi-node cluster give object storage (s3://BUCKET/...) or a folder on a "
                    "mount every node shares")
    if autoscaling:
        log.warning("local paths (%s) on an autoscaling cluster: every node it adds must mount them at the same "
                    "place; object storage (s3://) needs nothing of the nodes", ", ".join(local.values()))
