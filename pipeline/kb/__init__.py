"""The dual knowledge base: the object (knowledge_base), its store on disk or object storage (store), the purification
over both modalities (purification), the self-calibration that tunes it (calibrate), and its one build (build, out of
core, which ``rag4dmc kb build`` runs as Ray tasks: ``rag4dmc.pipeline.job.kb_runner``; in_memory runs the same build
in this process on input already in memory)."""
