"""Data in and out: one filesystem helper (local or s3://), dataset shards (parquet, JSONL, WebDataset tars),
the clip-retrieval embedding layout, shared paths, and the KB example images' cache."""
