"""Benchmarks of the paper, one module each. Importing this package registers them all."""

from ktm.benchmarks.common import REGISTRY, Benchmark, Example, Splits, get_benchmark, register

__all__ = ["REGISTRY", "Benchmark", "Example", "Splits", "get_benchmark", "register"]
from ktm.benchmarks import tree  # noqa: F401,E402  (registers "tree")
