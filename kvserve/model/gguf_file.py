"""A GGUF file's metadata and tensors, parsed with struct and numpy. gguf-py's GGUFReader builds
numpy views for every entry of every array, which for a 49k-token vocabulary costs ~3 s and
~160 MiB while loading; here arrays become plain lists and tensors views of one memory map."""
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# value types of GGUF metadata: struct format of the scalar ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # as GGUF stores it: innermost dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # read-only view: F32/F16 values, else the rows' raw block bytes (uint8)
    offset: int  # of data in the file


class GGUFFile:
    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        magic, version = self._read("4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        n_tensors, n_fields = self._read("QQ")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._read("I")
            dims = self._read(f"{n_dims}Q")
            kind, offset = self._read("IQ")
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        buffer = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(buffer, start, *info) for info in infos]

    def _tensor(self, buffer, start, name, dims, kind, offset) -> GGUFTensor:
        block, type_size = GGML_QUANT_SIZES[kind]
        rows = tuple(reversed(dims))  # numpy order: outermost first
        nbytes = int(np.prod(dims)) * type_size // block
        offset += start
        raw = buffer[offset:offset + nbytes]
        if kind in _NUMPY:
            data = raw.view(_NUMPY[kind]).reshape(rows)
        else:
            data = raw.reshape(*rows[:-1], rows[-1] // block * type_size)
        return GGUFTensor(name, tuple(dims), kind, data, offset)

    def release(self, t: GGUFTensor) -> None:
        """Drops t's pages from this process's memory once converted: they count in its RSS while
        mapped, and a model's file would otherwise stay resident beside the model it became."""
        start = t.offset - t.offset % mmap.PAGESIZE
        if hasattr(self._map, "madvise"):  # Python >= 3.8 on Unix
            self._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.data.nbytes - start)

    def _read(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._read("Q")
        s = self._map[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = self._read("IQ")
            if item in _SCALARS:  # numbers: one numpy read, not n struct calls
                dtype = np.dtype("<" + _SCALARS[item])
                values = np.frombuffer(self._map, dtype, n, self._pos).tolist()
                self._pos += n * dtype.itemsize
                return values
            return [self._value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._read(_SCALARS[kind])[0]
