"""The method's math (RAG4DMC's equations): nearest neighbours, the cross-modal mapping, purification,
fusion retrieval, FAISS indexes, candidate selection, metrics and statistics. No Ray, no fsspec, no model zoo."""
