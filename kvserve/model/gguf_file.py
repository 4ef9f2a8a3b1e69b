"""A GGUF file's metadata and tensors, parsed with struct and numpy. gguf-py's GGUFReader builds
numpy views for every entry of every array, which for a 49k-token vocabulary costs ~3 s and
~160 MiB while loading; here arrays become plain lists and tensors views of one memory map.

GGUF files come from anywhere, so every count, length, dimension and offset is checked against
the bytes the file has left before it is used: a hostile header gets a GGUFError, never a huge
allocation, a long loop or a view past the end of the map."""
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
_MIN_SIZE = {_STRING: 8, _ARRAY: 12}  # bytes of the smallest value of a type; scalars: their own
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: real files use none


class GGUFError(ValueError):
    """The file is not a well-formed GGUF file; the message names the first problem."""


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
            if f.seek(0, 2) < 24:
                raise GGUFError("not a GGUF file: shorter than its 24-byte header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = len(self._map)
        self._pos = 0
        magic, version = self._read("4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise GGUFError(f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        n_tensors, n_fields = self._read("QQ")
        self._check_count(n_fields, 8 + 4 + 1, "metadata entries")  # key length, value type, a byte
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.fields:
                raise GGUFError(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._read("I")[0])
        self._check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensors")  # name length, n_dims, a dim, type, offset
        infos, names = [], set()
        for _ in range(n_tensors):
            name = self._string()
            if name in names:
                raise GGUFError(f"tensor {name!r} appears twice")
            names.add(name)
            (n_dims,) = self._read("I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
            dims = self._read(f"{n_dims}Q")
            kind, offset = self._read("IQ")
            try:
                kind = GGMLQuantizationType(kind)
            except ValueError:
                raise GGUFError(f"tensor {name!r} has an unknown type {kind}") from None
            infos.append((name, dims, kind, offset))
        align = self.fields.get("general.alignment", 32)
        if type(align) is not int or not 0 < align <= 1 << 16 or align & (align - 1):
            raise GGUFError(f"general.alignment must be a power of two up to 65536, got {align!r}")
        start = -(-self._pos // align) * align
        buffer = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(buffer, start, align, *info) for info in infos]

    def _tensor(self, buffer, start, align, name, dims, kind, offset) -> GGUFTensor:
        if kind not in GGML_QUANT_SIZES:
            raise GGUFError(f"tensor {name!r} has a type without a known size ({kind.name})")
        block, type_size = GGML_QUANT_SIZES[kind]
        rows = tuple(reversed(dims))  # numpy order: outermost first
        if min(dims) < 1 or dims[0] % block:
            raise GGUFError(f"tensor {name!r}: shape {list(dims)} does not fit {kind.name} blocks of {block}")
        nbytes = type_size * (dims[0] // block)  # Python ints: no overflow, whatever the file claims
        for d in dims[1:]:
            nbytes *= d
        if offset % align or start + offset + nbytes > self._size:
            raise GGUFError(f"tensor {name!r}: {nbytes} bytes at offset {offset} are misaligned or run past "
                            f"the end of the file ({self._size} bytes)")
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
        size = struct.calcsize(fmt)
        if size > self._size - self._pos:
            raise GGUFError(f"truncated: {size} bytes needed at offset {self._pos} of {self._size}")
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += size
        return values

    def _check_count(self, n: int, min_bytes: int, what: str) -> None:
        """n items of at least min_bytes each must fit in what is left: checked before a loop or
        an allocation sized by n."""
        if n * min_bytes > self._size - self._pos:
            raise GGUFError(f"{n} {what} cannot fit in the {self._size - self._pos} bytes left at offset {self._pos}")

    def _string(self) -> str:
        (n,) = self._read("Q")
        self._check_count(n, 1, "string bytes")
        s = self._map[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, kind: int, depth: int = 0):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = self._read("IQ")
            if item not in _SCALARS and item not in _MIN_SIZE:
                raise GGUFError(f"unknown GGUF value type {item} in an array")
            if item == _ARRAY and depth >= _MAX_NESTING:
                raise GGUFError(f"arrays nested deeper than {_MAX_NESTING}")
            if item in _SCALARS:  # numbers: one numpy read, not n struct calls
                dtype = np.dtype("<" + _SCALARS[item])
                self._check_count(n, dtype.itemsize, "array items")
                values = np.frombuffer(self._map, dtype, n, self._pos).tolist()
                self._pos += n * dtype.itemsize
                return values
            self._check_count(n, _MIN_SIZE[item], "array items")
            return [self._value(item, depth + 1) for _ in range(n)]
        if kind not in _SCALARS:
            raise GGUFError(f"unknown GGUF value type {kind}")
        return self._read(_SCALARS[kind])[0]
