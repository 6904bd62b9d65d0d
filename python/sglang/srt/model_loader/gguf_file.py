"""A GGUF file's header, read straight from a memory map.

Layout (little-endian; versions 2 and 3 differ only in that 3 may also be big-endian, which
we refuse): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata
(key string, u32 value type, value); the tensor infos (name string, u32 n_dims, u64 dims
fastest-varying first, u32 ggml type, u64 offset into the data section); padding up to
`general.alignment` (default 32); the data section. A string is a u64 byte length + UTF-8.

gguf.GGUFReader builds a numpy view per field part, which for a tokenizer's ~100k vocab and
merge strings takes seconds; here the strings of an array are only walked over (we never
need them: transformers reads the tokenizer), and every tensor's byte range is checked
against the file size up front so that a truncated file fails before any tensor is read.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from sglang.srt.configs.model_config import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml tensors have at most 4 dims

# GGUF metadata value types -> struct format of one scalar (8 = string, 9 = array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, not decoded: where it starts and how many it holds."""

    offset: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: slowest-varying first (GGUF stores the reverse)
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute, in the file
    num_bytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data: np.ndarray  # uint8 [file size]: the memory-mapped file, read-only

    def strings(self, array: StringArray) -> list[str]:
        """The strings of a metadata string array (read on request: tokenizers hold ~100k)."""
        cursor = _Cursor(self.data, len(self.data))
        cursor.pos = array.offset
        return [cursor.string() for _ in range(array.count)]

    def raw_bytes(self, tensor: GGUFTensorInfo) -> np.ndarray:
        """The tensor's stored bytes, uint8 [rows, bytes per row] (a view of the memory map)."""
        return self.data[tensor.offset : tensor.offset + tensor.num_bytes].reshape(math.prod(tensor.shape[:-1]), -1)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer: Any, size: int) -> None:
        self.buffer = buffer
        self.size = size
        self.pos = 0

    def _advance(self, num_bytes: int) -> int:
        start = self.pos
        if num_bytes < 0 or start + num_bytes > self.size:
            raise ValueError(f"ends early: needs {num_bytes} bytes at offset {start}, file has {self.size}")
        self.pos = start + num_bytes
        return start

    def scalar(self, fmt: str) -> Any:
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.buffer, self._advance(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        start = self._advance(length)
        return bytes(self.buffer[start : start + length]).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self._advance(self.scalar("Q"))

    def check_room(self, count: int, min_size: int) -> None:
        """Fails at once on an array length that could not fit in the rest of the file."""
        if count * min_size > self.size - self.pos:
            raise ValueError(
                f"claims an array of {count} elements at offset {self.pos}, more than "
                f"the {self.size - self.pos} bytes left can hold"
            )

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise ValueError(f"unknown metadata value type {value_type} at offset {self.pos - 4}")

    def array(self) -> Any:
        element_type, count = self.scalar("I"), self.scalar("Q")
        if element_type in _SCALAR_FORMATS:
            dtype = np.dtype("<" + _SCALAR_FORMATS[element_type])
            start = self._advance(count * dtype.itemsize)
            return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start)  # a view
        if element_type == _STRING:
            self.check_room(count, 8)
            start = self.pos
            self.skip_strings(count)
            return StringArray(start, count)
        self.check_room(count, 12)  # nested arrays; an unknown type fails on the first element
        return [self.value(element_type) for _ in range(count)]


def read_gguf(path: str) -> GGUFFile:
    """Parses the header of a GGUF file and memory-maps its data; ModelLoadError naming the
    file if it is not GGUF, is of a version we cannot read, or is truncated or corrupt."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"is {size} bytes, shorter than a GGUF header")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = np.frombuffer(buffer, dtype=np.uint8)
        version, metadata, tensors = _parse_header(_Cursor(buffer, size))
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"cannot read GGUF file '{path}' (truncated or not GGUF?): {e}") from e
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, data=data)


def _parse_header(cursor: _Cursor) -> tuple[int, dict[str, Any], list[GGUFTensorInfo]]:
    magic = bytes(cursor.buffer[:4])
    cursor.pos = 4
    if magic != GGUF_MAGIC:
        raise ValueError(f"starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}")
    version = cursor.scalar("I")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        detail = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
        raise ValueError(
            f"has GGUF version {version}{detail}; we read versions {', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    num_tensors, num_metadata = cursor.scalar("Q"), cursor.scalar("Q")
    # Each metadata entry takes >= 12 bytes and each tensor info >= 24: corrupt counts fail here
    # rather than after a long loop.
    if num_metadata * 12 + num_tensors * 24 > cursor.size:
        raise ValueError(
            f"claims {num_tensors} tensors and {num_metadata} metadata entries, "
            f"more than its {cursor.size} bytes can hold"
        )

    metadata = {}
    for _ in range(num_metadata):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))

    infos = [_tensor_info(cursor) for _ in range(num_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"has general.alignment {alignment!r}; expected a positive integer")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [_locate(info, data_start, cursor.size) for info in infos]
    return version, metadata, tensors


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dims in GGUF order, ggml type, offset into the data section)."""
    name = cursor.string()
    num_dims = cursor.scalar("I")
    if not 1 <= num_dims <= _MAX_DIMS:
        raise ValueError(f"tensor '{name}' has {num_dims} dims")
    dims = tuple(cursor.scalar("Q") for _ in range(num_dims))
    return name, dims, cursor.scalar("I"), cursor.scalar("Q")


def _locate(info: tuple[str, tuple[int, ...], int, int], data_start: int, file_size: int) -> GGUFTensorInfo:
    name, dims, ggml_type, relative_offset = info
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor '{name}' has unknown ggml type {ggml_type}") from None
    if dims[0] % block_size != 0:
        raise ValueError(f"tensor '{name}' has rows of {dims[0]} values, not a multiple of its block size {block_size}")
    num_bytes = math.prod(dims) // block_size * type_size
    offset = data_start + relative_offset
    if offset + num_bytes > file_size:
        raise ValueError(
            f"tensor '{name}' lies at bytes [{offset}, {offset + num_bytes}), "
            f"past the end of the file ({file_size} bytes)"
        )
    return GGUFTensorInfo(
        name=name, shape=tuple(reversed(dims)), ggml_type=ggml_type, offset=offset, num_bytes=num_bytes
    )
