"""Tools built on the package: the `tokenmill` CLI, benchmarks (own and against peers), GGUF
conversion and training-run directories."""
