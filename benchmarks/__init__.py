"""fastflow benchmark suite: eager vs fused vs torch.compile, speed and memory (``python -m benchmarks``)."""
