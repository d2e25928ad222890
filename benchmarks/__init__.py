"""fedlayer benchmarks (not tests): communication, accuracy, memory, throughput."""
