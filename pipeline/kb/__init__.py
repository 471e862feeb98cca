"""The dual knowledge base: the object (knowledge_base), its store on disk or object storage (store), the purification
over both modalities (purification), the self-calibration that tunes it (calibrate), and its two builds: in memory
(in_memory) and out of core (build, which ``rag4dmc kb build`` runs: ``rag4dmc.pipeline.job.kb_runner``)."""
