"""FFCV loaders: augmented, seeded, resumable training batches and exact sharded evaluation.

Both yield `(images, labels, indices)`: uint8 NCHW images on the device (the
model normalises them, so a visual prompt can act on [0, 1] pixels first),
int64 labels on the device, and the records' indices on the CPU.
"""
from __future__ import annotations

import queue
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from .augment import SeededHorizontalFlip, SeededRandomResizedCrop


class ResumableOrder:
    """The epoch order of one process, startable at batch `skip_batches`.

    Each epoch is torch's DistributedSampler permutation (seeded by seed +
    epoch, padded with its first samples to a multiple of world_size, which is
    also what FFCV's distributed RANDOM order uses), cut into global batches
    of batch_size * world_size samples; process r takes the r-th contiguous
    block of each. So global batch b of a 1-process run is exactly process 0's
    batch b, then process 1's, ... of an N-process run with the same global
    batch size, and since gradient accumulation splits a batch into contiguous
    chunks (`Engine.split`), one process with engine.grad_accum_steps=N
    computes micro-batch r on the same images, in the same order, as process r
    (BatchNorm then normalises over the same images). Skipped batches are those
    of the uninterrupted epoch, so a run killed mid-epoch replays nothing and
    misses nothing.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int):
        # plain ints: FFCV counts records in numpy unsigned integers
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.skip_batches = 0

    def sample_order(self, epoch: int) -> np.ndarray:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # DistributedSampler's permutation
        order = torch.randperm(self.num_samples, generator=generator).numpy()
        per_process = -(-self.num_samples // self.world_size)
        order = np.resize(order, per_process * self.world_size)  # DistributedSampler's cyclic padding
        batches = per_process // self.batch_size  # drop_last
        order = order[: batches * self.world_size * self.batch_size].reshape(batches, self.world_size, self.batch_size)
        return order[self.skip_batches:, self.rank].reshape(-1).astype(np.uint64)


def _label_pipeline(device):
    # Squeeze(1), not Squeeze(): a last batch of one image must stay a 1-d tensor.
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]


def _index_pipeline():
    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _fail_loudly(epoch_iterator):
    """Make a dead FFCV loader thread an error instead of a hang.

    FFCV decodes in a background thread; if it raises, its consumer waits on
    the output queue forever (and in DDP the other processes wait with it).
    Polling the queue with a timeout lets us notice the thread is gone.
    """
    out, blocking_get = epoch_iterator.output_queue, epoch_iterator.output_queue.get

    def get(block=True, timeout=None):
        while True:
            try:
                return blocking_get(timeout=2.0)
            except queue.Empty:
                if not epoch_iterator.is_alive() and out.empty():
                    raise RuntimeError("the FFCV loader thread stopped with an error (see the exception printed above)") from None

    out.get = get
    return epoch_iterator


# Every FFCV loader made in this process stays referenced until exit. Freeing
# one frees its numba-compiled pipeline, and numba's dispatcher finalizer then
# prints an "Exception ignored ... KeyError" traceback (harmless, but it looks
# like a crash); a process makes only a few loaders (train + val per stage).
_KEEP_ALIVE: list = []


def _kept(loader: Loader) -> Loader:
    _KEEP_ALIVE.append(loader)
    return loader


@contextmanager
def _compiled(jit: bool):
    """FFCV compiles (or not) the pipeline of a Loader built inside this block.

    FFCV wraps each pipeline stage with numba when the Loader is built, after a
    process-wide switch. Compiling costs about 8 s per loader (a new loader,
    e.g. each stage's, compiles again) and pays off on large data: decoding
    runs in GIL-free threads. Uncompiled, the same functions run in Python and
    give the same batches (tests/test_data.py checks it): no compile at all,
    which is what tiny images want.
    """
    before = Compiler.is_enabled
    Compiler.set_enabled(jit)
    try:
        yield
    finally:
        Compiler.set_enabled(before)


class _Guarded:
    """An FFCV loader whose iterators fail loudly (see _fail_loudly)."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _fail_loudly(iter(self.loader))


def _image_tail(device, channels_last: bool):
    # ToDevice last: ToTorchImage(channels_last=False) copies into a buffer of its own, which FFCV allocates in
    # (pinned) host memory, so after a transfer it would bring the batch back to the host. Before ToDevice it
    # only permutes (channels_last) or makes NCHW contiguous on the host, and ToDevice keeps either layout.
    return [ToTensor(), ToTorchImage(channels_last=channels_last), ToDevice(device, non_blocking=True)]


class TrainLoader:
    """Random order seeded per epoch, reproducible random-resized-crop + flip, resumable mid-epoch."""

    def __init__(self, path: Path, *, res: int, batch_size: int, num_workers: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, min_crop_scale: float = 0.08,
                 augment: bool = True, crop_ratio: float = 0.875, channels_last: bool = False, jit: bool = True):
        self.batch_size = batch_size
        if augment:
            decode = [SeededRandomResizedCrop((res, res), seed, scale=(min_crop_scale, 1.0)), SeededHorizontalFlip(seed)]
        else:
            decode = [CenterCropRGBImageDecoder((res, res), ratio=crop_ratio)]
        with _compiled(jit):
            self.loader = _kept(Loader(
                str(path), batch_size=batch_size, num_workers=num_workers,
                order=OrderOption.RANDOM, seed=seed, distributed=world_size > 1, drop_last=True,
                os_cache=True,
                pipelines={
                    "image": [*decode, *_image_tail(device, channels_last)],
                    "label": _label_pipeline(device),
                    "index": _index_pipeline(),
                }))
        # Replaces FFCV's order object (same distributed order; see ResumableOrder).
        self.order = ResumableOrder(self.loader.reader.num_samples, batch_size, seed, rank, world_size)
        self.loader.traversal_order = self.order

    def __len__(self) -> int:
        """Batches in a full epoch on this process."""
        return len(self.loader)

    def epoch(self, epoch: int, skip_batches: int = 0):
        """Iterate the batches of `epoch` from `skip_batches` on."""
        self.order.skip_batches = skip_batches
        self.loader.next_epoch = epoch
        return _fail_loudly(iter(self.loader))


def val_loader(path: Path, *, res: int, batch_size: int, num_workers: int, device: torch.device,
               rank: int, world_size: int, crop_ratio: float = 0.875,
               channels_last: bool = False, jit: bool = True) -> _Guarded:
    """Center-crop evaluation over this rank's share of the records.

    The shares are disjoint strides of the file, not FFCV's distributed
    sampler, which pads with repeated samples: summed over ranks every record
    counts exactly once.
    """
    from ffcv.reader import Reader  # only to learn the record count
    num = Reader(str(path)).num_samples
    indices = np.arange(rank, num, world_size, dtype=np.uint64)  # int64 would mix into float64 inside FFCV
    with _compiled(jit):
        return _Guarded(_kept(Loader(
            str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
            indices=indices, drop_last=False, os_cache=True,
            pipelines={
                "image": [CenterCropRGBImageDecoder((res, res), ratio=crop_ratio), *_image_tail(device, channels_last)],
                "label": _label_pipeline(device),
                "index": _index_pipeline(),
            })))
