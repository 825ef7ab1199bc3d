"""`dare_common.DareError` under its older name, for the training/ modules that still import it from here (their
imports move to dare_common with the model work; then this module goes)."""

from dare_common import DareError

__all__ = ["DareError"]
