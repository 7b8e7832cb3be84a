"""Writes a copy of a quantized GGUF with its weights dequantized to bf16 or f32.

llama.cpp then runs the exact weights the other engines load (they dequantize the same file) in the
same dtype.  1-D tensors (norms) stay f32, as llama.cpp's own converter leaves them.
Usage: python benchmarks/gguf_convert.py SRC.gguf DST.gguf {bfloat16|float32}
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

_TARGET = {
    "bfloat16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "float32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: int) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)


def _convert_tensor(tensor: gguf.ReaderTensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if data.ndim == 1:
        return data.astype(np.float32)
    return gguf.quants.quantize(data, qtype)


def convert(src: Path, dst: Path, dtype: str) -> Path:
    """Writes dst unless it already exists; returns dst."""
    if dst.exists():
        return dst
    qtype, file_type = _TARGET[dtype]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    _copy_metadata(reader, writer, int(file_type))
    for tensor in reader.tensors:
        data = _convert_tensor(tensor, qtype)
        raw = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
