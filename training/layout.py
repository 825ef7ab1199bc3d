"""The prepared-data layout on disk: every user's event sequence stored once, samples as pointers into it.

    sequences/item.npy     int32 [E]    item row of every kept event, grouped by user row, oldest first
    sequences/cate.npy     int32 [E]    category row of every event
    sequences/time.npy     uint32 [E]   Unix timestamp (int64 when the --max-timestamp range does not fit uint32)
    sequences/offsets.npy  int64 [U+1]  user u's events are [offsets[u], offsets[u+1])
    <split>/user.npy       int32 [S]    user row of each sample
    <split>/position.npy   int32 [S]    index of the target event within its user's sequence (0 = oldest)
    <split>/cand_item.npy  int32 [S, C] column 0 the positive (the target event's item), columns 1.. its negatives
    <split>/cand_cate.npy  int32 [S, C]
    <split>/label.npy      uint8 [S, C] 1 for column 0, 0 elsewhere

Every file is a plain .npy, opened memory-mapped (read-only), so a reader holds in memory only what it touches; the
pages it touched stay mapped into the process (and count in its RSS) until `FileMappings.release` drops them, which
leaves them in the page cache: touched again, they come back with a minor page fault, without reading the disk. A sample's history is the `history_len` events of its user strictly before the target, oldest first,
left-padded with row 0: `Sequences.histories` slices it for a batch of samples at once (one vectorised gather).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.contract import PAD_INDEX

SEQUENCES_DIR = "sequences"
SEQUENCE_ARRAYS = ("item", "cate", "time", "offsets")
SAMPLE_ARRAYS = ("user", "position", "cand_item", "cand_cate", "label")
INDEX_DTYPE = np.int32  # item and category rows, user rows and positions on disk (widened to int64 per batch)


class LayoutError(ValueError):
    """A prepared-data folder's arrays are missing, unreadable or inconsistent; the message names the file."""


class FileMappings:
    """The read-only memory maps of one prepared folder's arrays, so that their pages can be dropped from the process."""

    def __init__(self) -> None:
        self.maps: list[mmap.mmap] = []

    def open(self, path: Path) -> np.ndarray:
        """The .npy at `path` as a read-only array over a memory map of the file; a LayoutError naming the file if
        it is missing or unreadable."""
        if not path.is_file():
            raise LayoutError(f"missing {path.parent.name}/{path.name}")
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = header(f)
                offset = f.tell()
                if dtype.hasobject:
                    raise ValueError("object arrays are not memory-mappable")
                count = int(np.prod(shape, dtype=np.int64))
                if offset + count * dtype.itemsize > path.stat().st_size:
                    raise ValueError("the file is shorter than its header says")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{path}: not a readable .npy file: {exc}") from None
        self.maps.append(mapped)
        flat = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)  # read-only: the map is ACCESS_READ
        return flat.reshape(shape, order="F" if fortran_order else "C")

    def release(self) -> None:
        """Drop every mapped page from this process (MADV_DONTNEED; the page cache keeps them). Where madvise is not
        available (not Linux) this does nothing, and the pages stay mapped until the arrays are closed."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mapped in self.maps:
            if not mapped.closed and len(mapped):
                mapped.madvise(mmap.MADV_DONTNEED)


def write_array(path: Path, array: np.ndarray, dtype: np.dtype | type) -> None:
    """Write `array` as .npy with the given dtype, refusing values the dtype cannot hold."""
    array = np.asarray(array)
    info = np.iinfo(dtype)
    if array.size and (int(array.min()) < info.min or int(array.max()) > info.max):
        raise LayoutError(f"{path.name}: values {int(array.min())}..{int(array.max())} do not fit {np.dtype(dtype).name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array.astype(dtype, copy=False), allow_pickle=False)


def time_dtype(max_timestamp: int, min_timestamp: int) -> type:
    return np.uint32 if 0 <= min_timestamp and max_timestamp <= np.iinfo(np.uint32).max + 1 else np.int64


@dataclass(frozen=True)
class Sequences:
    """The flat per-user event arrays (memory-mapped) and the history length samples are cut to."""

    item: np.ndarray  # int32 [E]
    cate: np.ndarray  # int32 [E]
    time: np.ndarray  # uint32 or int64 [E]
    offsets: np.ndarray  # int64 [U+1]
    history_len: int
    # The maps of the folder the arrays were opened from (sequences and splits), or None for in-memory arrays.
    mappings: FileMappings | None = field(default=None, repr=False, compare=False)

    @property
    def users(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def open(cls, folder: Path, history_len: int, mappings: FileMappings | None = None) -> Sequences:
        """The folder's sequences, mapped through `mappings` (a new FileMappings when None)."""
        mappings = FileMappings() if mappings is None else mappings
        base = Path(folder) / SEQUENCES_DIR
        arrays = {name: mappings.open(base / f"{name}.npy") for name in SEQUENCE_ARRAYS}
        events = len(arrays["item"])
        if any(arrays[n].ndim != 1 for n in SEQUENCE_ARRAYS) or len(arrays["cate"]) != events or len(arrays["time"]) != events:
            raise LayoutError(f"{base}: item, cate and time must be 1-D arrays of one length")
        offsets = np.asarray(arrays["offsets"], dtype=np.int64)  # small ([U+1]): read into memory
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != events or np.any(np.diff(offsets) < 0):
            raise LayoutError(f"{base}/offsets.npy must rise from 0 to the number of events ({events})")
        return cls(arrays["item"], arrays["cate"], arrays["time"], offsets, history_len, mappings)

    def release_pages(self) -> None:
        """Drop the pages of the folder's memory maps from this process (FileMappings.release); no-op in memory."""
        if self.mappings is not None:
            self.mappings.release()

    def histories(self, user: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hist_item, hist_cate int64 [B, L] for samples (user [B], target position [B]): the L events before each
        target, oldest first, left-padded with 0 (never reaching into another user's events)."""
        start = self.offsets[np.asarray(user, dtype=np.int64)]  # [B]
        position = np.asarray(position, dtype=np.int64)  # [B]
        length = self.history_len
        if len(self.item) == 0:
            empty = np.zeros((len(start), length), dtype=np.int64)
            return empty, empty.copy()
        # Row b is the L events before its target, values[target - L : target]: a row of the sliding-window view
        # (contiguous, copied row by row), whose first L - position slots precede the user's first event and are zeroed.
        # The few rows whose window would start before event 0 read from 0 and are then shifted right.
        target = start + position  # [B] global index of the target event
        first = target - length  # [B]
        padding = np.arange(length)[None, :] < (length - position)[:, None]  # [B, L]
        short = np.flatnonzero(first < 0)
        out = []
        for values in (self.item, self.cate):
            rows = np.empty((len(start), length), dtype=np.int64)  # [B, L]
            if len(values) >= length:
                window = np.lib.stride_tricks.sliding_window_view(values, length)  # [E - L + 1, L], a view
                rows[...] = window[np.maximum(first, 0)]  # int32 rows, widened once into the batch array
            for b in short if len(values) >= length else range(len(start)):
                lo = max(int(first[b]), 0)
                rows[b, length - (int(target[b]) - lo):] = values[lo : int(target[b])]
            rows[padding] = PAD_INDEX
            out.append(rows)
        return out[0], out[1]
