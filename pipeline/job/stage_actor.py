"""The job's actor class: a stage as Ray Data's callable class, in a module of its own so that an actor's process
imports only this, the stage contract and its own stage's module (a retrieval actor never imports torch, the
encoders or the rest of the plan).
"""

from __future__ import annotations

from rag4dmc.actors.stage import Stage, run_stage
from rag4dmc.pipeline.job.pool_usage import Meter


class StageActor:
    """A stage as Ray Data's callable class: ``setup`` once per actor, then :func:`rag4dmc.actors.stage.run_stage` per batch,
    each batch timed for the run's usage log (``rag4dmc.pipeline.job.pool_usage``)."""

    def __init__(self, stage: Stage, pool: str = "", usage=None):
        self.stage = stage
        self.meter = Meter(pool or stage.name, usage)  # started before the model loads: loading is alive, not busy
        stage.ensure_setup()

    def __call__(self, batch):
        with self.meter.batch(len(batch["row_key"])):
            return run_stage(batch, stage=self.stage)


def actor_class(stage: Stage) -> type[StageActor]:
    """:class:`StageActor` named after the stage, so Ray Data's logs and progress say which pool is which."""
    return type(f"{type(stage).__name__}Actor", (StageActor,), {"__module__": __name__})
