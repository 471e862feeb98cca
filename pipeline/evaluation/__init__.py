"""``rag4dmc evaluate``: the paper's table of variants on the user's complete data, and its report."""
