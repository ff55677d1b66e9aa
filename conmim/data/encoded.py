"""Encoded images held as slices of a few Arrow buffers (the Parquet source's image column)."""
from __future__ import annotations

import numpy as np


class EncodedImages:
    """Encoded images (JPEG/PNG bytes) as slices of a few large buffers -- one per Arrow chunk --
    with numpy start/stop offsets, instead of one Python ``bytes`` object per image.

    Why: forked loader workers share their parent's memory copy-on-write, and every read of a
    Python object writes its reference count, so with 1.28 M ``bytes`` objects each worker came to
    copy the pages of the whole set over the epochs. Reading a slice of a buffer writes nothing,
    so the pages stay shared; when the buffers are memory-mapped Arrow IPC files
    (``data.cache_dir``) the ranks of a node share them too, through the page cache.
    ``files[i]`` is a ``memoryview`` of image i; :meth:`take` selects without copying bytes."""

    def __init__(self, buffers: list, chunk: np.ndarray, start: np.ndarray, stop: np.ndarray):
        self.buffers = buffers  # uint8 numpy views of Arrow buffers (in memory or memory-mapped)
        self.chunk, self.start, self.stop = chunk, start, stop

    @classmethod
    def from_arrow(cls, column) -> "EncodedImages":
        """From a (chunked) binary / large_binary Arrow column, its buffers as they are."""
        import pyarrow as pa
        buffers, chunk, start, stop = [], [], [], []
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        for arr in chunks:
            if len(arr) == 0:
                continue
            if arr.null_count:
                raise ValueError("parquet: the image column has null images")
            _, offsets, data = arr.buffers()
            dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
            off = np.frombuffer(offsets, dtype=dtype)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
            chunk.append(np.full(len(arr), len(buffers), dtype=np.int32))
            start.append(off[:-1])
            stop.append(off[1:])
            buffers.append(np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8))
        if not buffers:
            return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return cls(buffers, np.concatenate(chunk), np.concatenate(start), np.concatenate(stop))

    @classmethod
    def concat(cls, parts: list["EncodedImages"]) -> "EncodedImages":
        buffers, chunk = [], []
        for p in parts:
            chunk.append(p.chunk + len(buffers))
            buffers += p.buffers
        return cls(buffers, np.concatenate(chunk) if chunk else np.zeros(0, np.int32),
                   np.concatenate([p.start for p in parts]) if parts else np.zeros(0, np.int64),
                   np.concatenate([p.stop for p in parts]) if parts else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.chunk)

    def __getitem__(self, i) -> memoryview:
        return memoryview(self.buffers[self.chunk[i]][self.start[i]: self.stop[i]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, keep) -> "EncodedImages":
        keep = np.asarray(keep, dtype=np.int64)
        return EncodedImages(self.buffers, self.chunk[keep], self.start[keep], self.stop[keep])

    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self.buffers))
