"""The dual knowledge base: ``rag4dmc kb build`` (runner), its out-of-core build, the KB in memory, its
store on disk or object storage, and the self-calibration that tunes it."""
