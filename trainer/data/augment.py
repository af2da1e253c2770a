"""FFCV operations whose randomness is reproducible.

FFCV's own RandomResizedCrop and RandomHorizontalFlip draw from numba's
per-thread generators, which are seeded from entropy and shared by whichever
worker thread picks a sample up, so two runs never see the same augmentations
and a resumed run cannot replay the batches it lost. Here each sample reseeds
the generator from (seed, sample index, the batch's first and last index)
right before its draws. The batch composition comes from FFCV's seeded
per-epoch order, so augmentations differ from epoch to epoch yet are a pure
function of (seed, epoch, position): the same on every run, thread count and
restart.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

_MASK32 = 0xFFFFFFFF


def sample_seed(base: int, sample: int, first: int, last: int) -> int:
    """Mix the identifiers into a 32-bit seed (numba-compatible integer arithmetic)."""
    h = (base * 0x9E3779B1 + sample) & _MASK32
    h = (h * 0x85EBCA77 + first) & _MASK32
    h = (h * 0xC2B2AE3D + last) & _MASK32
    return (h ^ (h >> 16)) & _MASK32


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder (decode, crop, resize in one pass) with reproducible crops."""

    def __init__(self, output_size, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = int(seed) & _MASK32

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        seed_c = Compiler.compile(sample_seed)
        scale, ratio, base = np.array(self.scale), np.array(self.ratio), self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            first, last = batch_indices[0], batch_indices[len(batch_indices) - 1]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                np.random.seed(seed_c(base, source_ix, first, last))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """Flip each HWC uint8 image with probability 1/2, reproducibly (see module docstring)."""

    def __init__(self, seed: int):
        super().__init__()
        # A different stream from the crop's, which reseeds from the same identifiers.
        self.seed = (int(seed) + 0x5BD1E995) & _MASK32

    def generate_code(self):
        my_range = Compiler.get_iterator()
        seed_c = Compiler.compile(sample_seed)
        base = self.seed

        def flip(images, dst, indices):
            first, last = indices[0], indices[len(indices) - 1]
            for i in my_range(images.shape[0]):
                np.random.seed(seed_c(base, indices[i], first, last))
                if np.random.random() < 0.5:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
