"""A write-only byte stream that archive writers (zipfile, tarfile, pyarrow) write into and a streamed answer
takes from batch by batch, so an archive of any size needs only one batch in memory."""

from __future__ import annotations


class ByteSink:
    """Unseekable: keeps what was written until `take()`."""

    closed = False

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data
