"""How streamed step inputs are cut into batches (each batch is one task run and one Parquet part)."""
from __future__ import annotations

from typing import Iterable, Iterator

import pandas as pd


def row_batches(frames: Iterable[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of exactly ``size`` rows (the last may be shorter)."""
    buf: list[pd.DataFrame] = []
    held = 0
    for frame in frames:
        while len(frame):
            take = frame.iloc[: size - held]
            frame = frame.iloc[len(take):]
            buf.append(take)
            held += len(take)
            if held == size:
                yield pd.concat(buf, ignore_index=True)
                buf, held = [], 0
    if held:
        yield pd.concat(buf, ignore_index=True)


def group_batches(frames: Iterable[pd.DataFrame], key: str, max_groups: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of at most ``max_groups`` whole groups (rows of a group are
    contiguous in the stream, as the previous step wrote them)."""
    buf: pd.DataFrame | None = None
    for frame in frames:
        if not len(frame):
            continue
        buf = frame.reset_index(drop=True) if buf is None else pd.concat([buf, frame], ignore_index=True)
        codes = buf[key].ne(buf[key].shift()).cumsum()  # 1, 1, 2, 2, 2, 3 ...
        complete = int(codes.iloc[-1]) - 1  # the last group may continue in the next frame
        while complete >= max_groups:
            cut = codes <= max_groups
            yield buf[cut].reset_index(drop=True)
            buf, codes = buf[~cut].reset_index(drop=True), codes[~cut].reset_index(drop=True) - max_groups
            complete -= max_groups
    if buf is not None and len(buf):
        codes = buf[key].ne(buf[key].shift()).cumsum()
        for lo in range(0, int(codes.iloc[-1]), max_groups):
            yield buf[(codes > lo) & (codes <= lo + max_groups)].reset_index(drop=True)


def empty_frame(columns: list[str], ints: tuple[str, ...] = ()) -> pd.DataFrame:
    """A step output with no rows but the step's columns (an empty step is valid)."""
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c in ints else object) for c in columns})
