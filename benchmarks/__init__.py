"""Benchmarks of dk-jax: `python -m benchmarks.ops`, `python -m benchmarks.models`."""
