"""Zero-copy reads of one safetensors file, as NumPy views of a memory map.

safetensors' own NumPy backend cannot return bfloat16 tensors, and its Flax backend makes several transient
copies of each tensor (bytes, NumPy, device). The format is small enough to map directly: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Tensor names, shapes and read-only array views of one `.safetensors` file. Use as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._header = header
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + header_len)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._data = None  # drops the mapping once the views taken from it are gone

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` in its stored dtype (no copy)."""
        entry = self._header[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {self.path.name} has dtype {entry['dtype']}; jaxmoe reads "
                             f"{', '.join(_DTYPES)}")
        start, end = entry["data_offsets"]
        return self._data[start:end].view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
