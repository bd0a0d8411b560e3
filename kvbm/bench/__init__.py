"""``kvbm bench``: the main job. A multi-turn workload replayed against a chain."""

from .runner import BenchOptions, BenchReport, run_bench
from .workload import Turn, multi_turn_workload

__all__ = ["BenchOptions", "BenchReport", "Turn", "multi_turn_workload", "run_bench"]
