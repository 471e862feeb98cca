"""Column types between the job's stages."""

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

from pipeline.schema import numpy_stage, restore_nulls


def test_an_all_null_string_column_survives_a_pass_through_stage():
    """Ray hands a stage an all-null column as float NaN; passed on as is, its block would not unify with
    the string blocks of the same column. Stages restore it to None first."""
    block = BlockAccessor.batch_to_block({"row_key": np.array(["a", "b"], object),
                                          "image_uri": np.array([None, None], object)})
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    assert batch["image_uri"].dtype.kind == "f"  # what Ray does (the reason for restore_nulls)

    @numpy_stage
    def pass_through(b):
        return b

    out = BlockAccessor.batch_to_block(pass_through(batch))
    strings = pa.table({"row_key": ["c"], "image_uri": ["s3://bucket/c.jpg"]})
    merged = pa.concat_tables([out, strings], promote_options="default")
    assert merged.column("image_uri").to_pylist() == [None, None, "s3://bucket/c.jpg"]
    assert restore_nulls({"seconds_embed": np.array([np.nan])})["seconds_embed"].dtype.kind == "f"  # numbers stay
