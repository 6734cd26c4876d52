"""Benchmarks of the paper, one module each. Importing this package registers them all."""

from ktm.benchmarks.common import REGISTRY, Benchmark, Example, Splits, get_benchmark, register

__all__ = ["REGISTRY", "Benchmark", "Example", "Splits", "get_benchmark", "register"]
from ktm.benchmarks import tree  # noqa: F401  (registers "tree")
from ktm.benchmarks import amazon  # noqa: F401  (registers "amazon")
from ktm.benchmarks import rotten_tomatoes  # noqa: F401  (registers "rotten_tomatoes")
from ktm.benchmarks import commitpack  # noqa: F401  (registers "commitpack")
from ktm.benchmarks import reading  # noqa: F401  (registers "reading")
