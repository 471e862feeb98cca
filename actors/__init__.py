"""Callable classes that Ray runs: encoders, retrievers, generators, scorers, CPU preprocessing."""
