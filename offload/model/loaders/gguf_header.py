"""A fast reader of GGUF headers: the subset of gguf.GGUFReader the loaders use, in one pass over the bytes.

GGUFReader makes a numpy memmap view per element of every metadata array, so SmolLM2's 49K-token
vocabulary and 48K merges cost 2-4 s (147K field parts, 1.2M memmap slices; bench/RESULTS.md, issue 15);
here each string is one struct read and one slice of a bytes object. Tensors are numpy views into one
read-only memmap of the file, shaped as GGUFReader shapes them (quantized types: uint8 rows of blocks).

    reader = GGUFHeader(path)          # .fields[key].contents(), .tensors[i].name/.tensor_type/.shape/.data
Files that are not little-endian GGUF v2/v3 are left to GGUFReader (GGUFHeader.read returns None).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class Field:
    def __init__(self, value):
        self._value = value

    def contents(self):
        return self._value


@dataclass
class Tensor:
    name: str
    tensor_type: object        # gguf.GGMLQuantizationType
    shape: np.ndarray          # GGUF order: fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data_offset: int           # absolute, in the file
    data: np.ndarray


class GGUFHeader:
    def __init__(self, fields: dict, tensors: list):
        self.fields, self.tensors = fields, tensors

    @classmethod
    def read(cls, path: Path) -> "GGUFHeader | None":
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        mm = np.memmap(path, mode="r")
        buf = memoryview(mm)
        if bytes(buf[:4]) != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            return None
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def string(p):
            n = struct.unpack_from("<Q", buf, p)[0]
            return bytes(buf[p + 8:p + 8 + n]).decode("utf-8", errors="replace"), p + 8 + n

        def value(kind, p):
            if kind == _STRING:
                return string(p)
            if kind == _ARRAY:
                sub, n = struct.unpack_from("<IQ", buf, p)
                p += 12
                if sub == _STRING:
                    out = []
                    for _ in range(n):
                        s, p = string(p)
                        out.append(s)
                    return out, p
                if sub in _NUMPY:   # numbers in bulk
                    arr = np.frombuffer(buf, dtype=_NUMPY[sub], count=n, offset=p)
                    return arr.tolist(), p + arr.nbytes
                out = []
                for _ in range(n):
                    v, p = value(sub, p)
                    out.append(v)
                return out, p
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)

        fields = {"GGUF.version": Field(struct.unpack_from("<I", buf, 4)[0]), "GGUF.tensor_count": Field(n_tensors),
                  "GGUF.kv_count": Field(n_kv)}     # GGUFReader's pseudo-fields
        for _ in range(n_kv):
            key, pos = string(pos)
            kind = struct.unpack_from("<I", buf, pos)[0]
            v, pos = value(kind, pos + 4)
            fields[key] = Field(v)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
        align = int(fields["general.alignment"].contents()) if "general.alignment" in fields else 32
        start = pos + (-pos) % align
        tensors = []
        for name, dims, kind, offset in infos:
            n = int(np.prod(dims, dtype=np.int64))
            block, size = GGML_QUANT_SIZES[kind]
            n_bytes = n // block * size
            at = start + offset
            raw = mm[at:at + n_bytes]
            rev = tuple(int(d) for d in reversed(dims))
            plain = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                     "I32": np.int32, "I64": np.int64}.get(kind.name)
            if plain is not None:
                data = raw.view(plain).reshape(rev)
            else:   # blocks: uint8 rows of the fastest dimension's bytes
                data = raw.reshape(*rev[:-1], rev[-1] // block * size)
            tensors.append(Tensor(name, kind, np.array(dims, dtype=np.uint64), n, n_bytes, at, data))
        return cls(fields, tensors)
