"""Performance tools: profiling and technique benchmarks (the doctor is :mod:`kiln.doctor`)."""
