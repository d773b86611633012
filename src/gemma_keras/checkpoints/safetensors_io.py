"""The safetensors format, read lazily with numpy memory maps and written atomically.

The `safetensors` package's numpy API has no bfloat16, the dtype most Gemma
checkpoints use, so the (simple, documented) format is handled here:
8 bytes little-endian header length, a JSON header `{name: {dtype, shape,
data_offsets}}`, then the raw tensor bytes.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from gemma_keras.checkpoints.weight_mapping import WeightsError

_DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsTensor:
    """One tensor of a file, read (memory-mapped) only when converted to an array."""

    def __init__(self, path, dtype, shape, offset):
        self.path, self.dtype, self.shape, self.offset = path, dtype, tuple(shape), offset

    def __array__(self, dtype=None, copy=None):
        array = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        return np.array(array, dtype=dtype)


def read_safetensors(path):
    """`{name: SafetensorsTensor}`, every header entry checked against the file size."""
    path = os.fspath(path)
    size = os.path.getsize(path)

    def corrupt(why):
        return WeightsError(
            f"{path} is not a valid safetensors file ({why}); it may be truncated or "
            "corrupted: download or copy it again."
        )

    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise corrupt(f"header of {header_length} bytes in a {size}-byte file")
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise corrupt(f"unreadable header: {error}") from None
    data_start = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise WeightsError(
                f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}."
            )
        dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise corrupt(f"tensor {name!r} lies outside the file or has a wrong size")
        tensors[name] = SafetensorsTensor(path, dtype, entry["shape"], data_start + begin)
    return tensors


def write_safetensors(path, arrays, metadata=None):
    """Writes `{name: array}` to `path` (via a temporary file, so no partial file remains)."""
    header, offset, ordered = {}, 0, []
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        if array.dtype not in _NAMES:
            raise WeightsError(
                f"cannot write {name!r}: dtype {array.dtype} has no safetensors code."
            )
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        ordered.append(array)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    temporary = f"{path}.partial"
    with open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for array in ordered:
            file.write(array.tobytes())
    os.replace(temporary, path)
