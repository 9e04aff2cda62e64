"""Benchmarks that print figures: engine micro-benchmark, pipeline, latency, soak."""
