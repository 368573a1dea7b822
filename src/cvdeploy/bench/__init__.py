"""Benchmarking: the timing harness (warmup apart, percentiles, stages), op profiles and engine tuning."""

from cvdeploy.bench.harness import BenchResult, LatencyStats, bench_engine, bench_pipelined, bench_sequential, measure

__all__ = ["BenchResult", "LatencyStats", "bench_engine", "bench_pipelined", "bench_sequential", "measure"]
