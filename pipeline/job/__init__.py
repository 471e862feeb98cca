"""``rag4dmc complete`` as clip-retrieval splits a job: reader (input shards), mapper (the plan of stages and
their actor pools), writer (committed output) and runner (identity, resume, retry, summary)."""
