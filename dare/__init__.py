"""The `dare` command line: one entry point over training/, service/ and loadtest/."""

from dare_common import __version__

__all__ = ["__version__"]
