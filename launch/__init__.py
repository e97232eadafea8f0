"""Ways to run qshard: the CLI, torchrun, Ray actors and jobs, benchmarks."""
