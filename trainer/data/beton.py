"""Writing FFCV .beton files: atomically, once, cached under a key of everything that shapes them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter


def cache_key(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def image_field(write_mode: str, max_resolution: int | None, jpeg_quality: int,
                compress_probability: float) -> RGBImageField:
    return RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                         jpeg_quality=jpeg_quality, compress_probability=compress_probability)


def write_beton(dataset, path: Path, field: RGBImageField, num_workers: int) -> Path:
    """Write (image, label, index) records to `path`; a crash never leaves a half file there.

    The `index` field is the record's position in the file: it lets tests check
    which samples each rank saw, and evaluation count every sample exactly once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = DatasetWriter(str(tmp), {"image": field, "label": IntField(), "index": IntField()},
                           num_workers=num_workers)
    try:
        writer.from_indexed_dataset(dataset, chunksize=64)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
