"""augnet's benchmarks (not installed with the package); run ``python benchmarks/bench_jacobian.py``."""
