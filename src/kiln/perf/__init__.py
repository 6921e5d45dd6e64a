"""Performance tools: profiling, technique benchmarks and the training doctor."""
