"""The header of a .safetensors file, read without its tensors (and without torch): the one reader the checkpoint
checks, the streamed stages' sources and the memory plan share.

Layout: 8 bytes little-endian n, then n bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
then the tensors' bytes (data_offsets count from the end of the header).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, where the tensors' bytes start: 8 + n) of the safetensors file
    at `path`, "__metadata__" left out. ValueError when the file cannot hold such a header (its length is zero or
    past the file's end, or the JSON is no object); OSError when it cannot be read."""
    path = Path(path)
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length < path.stat().st_size:
            raise ValueError(f"{path}: a header of {length} bytes does not fit the file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length
