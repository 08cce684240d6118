"""What models are evaluated on: published benchmarks read from local files (`benchmarks/`)."""
