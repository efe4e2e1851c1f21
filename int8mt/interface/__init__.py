"""The Python API behind the CLI: each function takes plain arguments and does one job."""
