"""Column types between the job's stages: a column keeps one Arrow type whatever a batch holds."""

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

from rag4dmc.actors.stage import Column, Produced, Stage, run_stage
from rag4dmc.pipeline.job.stage_actor import StageActor
from rag4dmc.pipeline.schema import OUTPUT_SCHEMA, restore_nulls


class PassThrough(Stage):
    """Touches no row: what the job's stages do to the rows of other tasks."""

    tasks = ("i2t",)
    writes = (Column("x", 0.0, np.float32),)

    def process(self, rows):
        return Produced({"x": np.ones(len(rows["row_key"]), np.float32)})


def _objects(values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_ray_turns_all_null_and_passed_through_list_columns_into_other_types():
    """What Ray Data does with untyped numpy batches: the reason stages restore and type their columns."""
    block = BlockAccessor.batch_to_block({"image_uri": _objects([None, None]),
                                          "fusion_scores": _objects([[0.5, 0.4], [0.3, 0.2]])})
    assert pa.types.is_null(block.schema.field("image_uri").type)
    assert pa.types.is_list(block.schema.field("fusion_scores").type)
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    assert batch["image_uri"].dtype.kind == "f"  # the next stage gets NaN
    passed_on = BlockAccessor.batch_to_block(batch)  # the lists come back as numpy arrays: now a tensor
    assert not pa.types.is_list(passed_on.schema.field("fusion_scores").type)
    restored = restore_nulls(batch)
    assert list(restored["image_uri"]) == [None, None]
    assert [list(v) for v in restored["fusion_scores"]] == [[0.5, 0.4], [0.3, 0.2]]


def test_blocks_of_a_stage_combine_whatever_their_batches_hold():
    """Batches with all-null strings, equal-length lists, ragged lists and nulls: every output block has
    the schema's types, so Ray Data can combine them (the job failed here on 1,000 generated rows)."""
    stage = PassThrough()
    rectangular = {"row_key": _objects(["a", "b"]), "task": _objects(["t2i", "t2i"]), "image_uri": _objects([None, None]),
                   "fusion_scores": _objects([[0.5, 0.4], [0.3, 0.2]]), "query": np.ones((2, 3), np.float32)}
    ragged = {"row_key": _objects(["c", "d"]), "task": _objects(["t2i", "i2t"]), "image_uri": _objects(["s3://b/c.jpg", None]),
              "fusion_scores": _objects([[0.9], None]), "query": np.zeros((2, 3), np.float32)}
    blocks = [run_stage(rectangular, stage=stage), StageActor(stage)(ragged)]
    merged = pa.concat_tables(blocks)
    assert merged.schema.field("fusion_scores").type == OUTPUT_SCHEMA.field("fusion_scores").type
    assert merged.column("image_uri").to_pylist() == [None, None, "s3://b/c.jpg", None]
    assert merged.column("fusion_scores").to_pylist()[3] is None
    np.testing.assert_allclose(merged.column("fusion_scores").to_pylist()[0], [0.5, 0.4])
    assert np.asarray(merged.column("query").to_pylist()).shape == (4, 3)  # other columns as Ray makes them
    assert merged.column("x").to_pylist() == [0.0, 0.0, 0.0, 1.0]  # declared fill where the stage did not run
