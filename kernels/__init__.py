"""Triton kernels and their thin launchers on raw tensors (installed as ``fastflow.kernels``)."""
