"""Moved to ``kvbm_bench``; this path stays for code that imports it."""

from kvbm_bench.config import BenchOptions
from kvbm_bench.runner import BenchReport, run_bench
from kvbm_bench.workload import Turn, multi_turn_workload

__all__ = ["BenchOptions", "BenchReport", "Turn", "multi_turn_workload", "run_bench"]
