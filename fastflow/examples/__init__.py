"""Runnable examples: ``python -m fastflow.examples.toy`` trains a TabularFlow on a 2-D toy density."""

from fastflow.examples.toy_data import TOY_DATASETS, eight_gaussians, toy_dataset, two_moons

__all__ = ["TOY_DATASETS", "eight_gaussians", "toy_dataset", "two_moons"]
