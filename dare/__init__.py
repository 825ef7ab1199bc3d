"""The `dare` command line: one entry point over training/, service/ and loadtest/."""

__version__ = "0.1.0"
