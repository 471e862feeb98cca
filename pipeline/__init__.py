"""Driver-side job: configuration, data I/O, knowledge base, retrieval, evaluation, CLI."""
