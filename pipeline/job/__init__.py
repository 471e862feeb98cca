"""The two Ray jobs, split as clip-retrieval splits one: reader (input shards), mapper (the plan of stages and their
actor pools), writer (committed output) and runner. ``runner`` runs ``rag4dmc complete`` (identity, resume, retry,
summary); ``kb_runner`` runs ``rag4dmc kb build`` (embeddings of both sides, then ``rag4dmc.pipeline.kb.build``).
Beside them: census (the input's directions), scaling (pool sizes from the cluster), in_flight, pool_usage."""
