"""Analysis: resolution sweeps, recipe comparison (tables, plots) and benchmarks (`bench`)."""
