"""Ops: each file holds an op's math, its eager reference twin and the dispatch to its Triton kernel."""
