"""`dare_common.int_list` under its older name, for training/cli.py (its import moves to dare_common with the model
work; then this module goes)."""

from dare_common import int_list

__all__ = ["int_list"]
