"""FFCV data pipeline on real .beton files: writing, splits, reproducible augmentation, sharding."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY, write_image_folder
from trainer.config import load_config
from trainer.data import DataError, TrainLoader, prepare_data, scan_image_folder, split_per_class, val_loader
from trainer.data.imagefolder import limit_per_class

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic_files(beton_dir):
    cfg = load_config(TINY + [f"data.beton_dir={beton_dir}"])
    return prepare_data(cfg.data, is_writer=True, log=lambda m: None)


def _train(files, rank=0, world=1, batch=32, seed=0):
    return TrainLoader(files.train, res=32, batch_size=batch, num_workers=2, seed=seed, device=CPU,
                       rank=rank, world_size=world, min_crop_scale=0.35)


def _epoch(loader, epoch, skip=0):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader.epoch(epoch, skip)]


def test_synthetic_betons_have_expected_counts(synthetic_files):
    assert (synthetic_files.num_train, synthetic_files.num_val, synthetic_files.num_classes) == (640, 200, 10)
    assert synthetic_files.train.exists() and synthetic_files.val.exists()


def test_augmentation_is_reproducible_and_resumable(synthetic_files):
    loader = _train(synthetic_files)
    first, again = _epoch(loader, 3), _epoch(_train(synthetic_files), 3)
    assert len(first) == 640 // 32
    for (x1, y1, i1), (x2, y2, i2) in zip(first, again):  # a fresh loader replays the same pixels
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)
    resumed = _epoch(loader, 3, skip=7)  # starting mid-epoch gives exactly the remaining batches
    assert len(resumed) == len(first) - 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first[7:], resumed))
    other = _epoch(loader, 4)  # another epoch: another order and other crops
    assert not torch.equal(first[0][2], other[0][2])
    # Augmentation is really random: the same image is cropped/flipped differently across epochs.
    a = {int(i): x[k] for x, _, idx in first for k, i in enumerate(idx)}
    b = {int(i): x[k] for x, _, idx in other for k, i in enumerate(idx)}
    differing = sum(not torch.equal(a[i], b[i]) for i in a)
    assert differing > 0.8 * len(a)
    assert first[0][0].dtype == torch.uint8 and first[0][0].shape == (32, 3, 32, 32)


def test_uncompiled_pipeline_gives_the_compiled_batches(synthetic_files):
    """data.jit=false (the tests' setting) decodes in plain Python: the same pixels, labels and order as
    numba's compiled pipeline, augmentation and evaluation crop alike, and two epochs with a resume."""
    def batches(jit):
        train = TrainLoader(synthetic_files.train, res=32, batch_size=64, num_workers=2, seed=3, device=CPU,
                            min_crop_scale=0.35, jit=jit)
        val = val_loader(synthetic_files.val, res=32, batch_size=64, num_workers=1, device=CPU, rank=0,
                         world_size=1, jit=jit)
        return [*_epoch(train, 0), *_epoch(train, 1, skip=3), *[(x.clone(), y.clone(), i.clone()) for x, y, i in val]]

    compiled, plain = batches(True), batches(False)
    assert len(compiled) == len(plain) == 10 + 7 + 4
    for k, (a, b) in enumerate(zip(compiled, plain)):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), f"batch {k} differs"


def test_val_shards_cover_every_record_once(synthetic_files):
    seen = []
    for rank in range(3):
        for _, _, idx in val_loader(synthetic_files.val, res=32, batch_size=16, num_workers=1, device=CPU,
                                    rank=rank, world_size=3):
            seen += idx.tolist()
    assert sorted(seen) == list(range(200))
    last = list(val_loader(synthetic_files.val, res=32, batch_size=199, num_workers=1, device=CPU,
                           rank=0, world_size=1))[-1]
    assert last[1].shape == (1,) and last[2].shape == (1,)  # a final batch of one stays 1-d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, train_path, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from trainer.data.prepare import DataFiles
    files = DataFiles(train_path, train_path, (), 0, 0)
    batches = [idx.tolist() for _, _, idx in _train(files, rank=rank, world=world, batch=16).epoch(2)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(batches, f)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_see_disjoint_samples_forming_the_global_batches(synthetic_files, tmp_path):
    """Real 2-process gloo group; FFCV loaders in distributed mode."""
    mp.spawn(_rank_main, args=(2, _free_port(), synthetic_files.train, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    flat0, flat1 = {i for b in r0 for i in b}, {i for b in r1 for i in b}
    assert flat0.isdisjoint(flat1)
    assert len(flat0) == len(flat1) == 640 // 2
    # One process with the same global batch (32) sees, batch by batch, the union of the two ranks' batches.
    single = [idx.tolist() for _, _, idx in _train(synthetic_files, batch=32).epoch(2)]
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(s) for s in single]


def test_split_per_class_is_seeded_and_stratified(tmp_path):
    root = write_image_folder(tmp_path / "tree", per_class=10, num_classes=3)
    images = scan_image_folder(root)
    assert images.classes == ("class_0", "class_1", "class_2") and len(images) == 30
    train, val = split_per_class(images, 0.2, seed=0)
    train2, val2 = split_per_class(images, 0.2, seed=0)
    assert val.paths == val2.paths and set(train.paths).isdisjoint(val.paths)
    assert len(train) + len(val) == 30
    assert sorted(np.bincount(val.labels).tolist()) == [2, 2, 2]
    assert split_per_class(images, 0.2, seed=1)[1].paths != val.paths
    # data.train_per_class / val_per_class: a seeded choice per class, nested as the limit grows
    three, five = limit_per_class(train, 3, seed=1), limit_per_class(train, 5, seed=1)
    assert np.bincount(three.labels).tolist() == [3, 3, 3] and set(three.paths) < set(five.paths)
    assert limit_per_class(train, 3, seed=1) == three and limit_per_class(train, 3, seed=2) != three
    assert limit_per_class(train, None, seed=1) is train and limit_per_class(train, 100, seed=1) == train


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(tmp_path / "empty")
    root = write_image_folder(tmp_path / "tree", per_class=1, num_classes=2)
    with pytest.raises(DataError, match="not among the 1 classes"):
        scan_image_folder(root, classes=("class_0",))
    # an empty class folder is named (torchvision's ImageFolder refuses the tree), or left out on request
    (root / "class_00_empty").mkdir()
    with pytest.raises(DataError, match=r"class_00_empty: an empty class folder, .*data.empty_classes=skip"):
        scan_image_folder(root)
    skipped = scan_image_folder(root, empty="skip")
    assert skipped.classes == ("class_0", "class_1") and sorted(skipped.labels) == [0, 1]
    assert scan_image_folder(root, classes=("class_00_empty", "class_0", "class_1")).labels == (1, 2)


def test_imagefolder_betons_with_carved_split(tmp_path):
    root = write_image_folder(tmp_path / "tree", per_class=10, num_classes=3, size=40)
    cfg = load_config(["data=imagefolder", f"data.train_dir={root}", f"data.beton_dir={tmp_path / 'b'}",
                       "data.val_fraction=0.2", "data.num_workers=1"])
    files = prepare_data(cfg.data, is_writer=True, log=lambda m: None)
    assert (files.num_train, files.num_val, files.classes) == (24, 6, ("class_0", "class_1", "class_2"))
    labels = [y for _, y, _ in val_loader(files.val, res=32, batch_size=6, num_workers=1, device=CPU,
                                          rank=0, world_size=1)][0]
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    small = prepare_data(load_config(["data=imagefolder", f"data.train_dir={root}", f"data.beton_dir={tmp_path / 'b'}",
                                      "data.val_fraction=0.2", "data.train_per_class=3", "data.val_per_class=1",
                                      "data.num_workers=1"]).data, is_writer=True, log=lambda m: None)
    assert (small.num_train, small.num_val) == (9, 3) and small.train != files.train  # its own cache entry


@pytest.mark.parametrize("channels_last", [False, True])
def test_image_batches_end_on_the_engine_device(synthetic_files, channels_last):
    """FFCV puts an op's output buffer where its allocation says (no device: pinned host memory). Followed
    through the image pipeline for a GPU, the batch must end on the GPU for both memory formats:
    ToTorchImage(channels_last=False) after ToDevice copied it back to the host (a device mismatch on GPU)."""
    from ffcv.pipeline.state import State
    from trainer.data.loaders import _image_tail
    gpu = torch.device("cuda", 0)  # only named: nothing is allocated
    state, where = State(jit_mode=True, device=CPU, shape=(32, 32, 3), dtype=np.dtype("uint8")), CPU
    for op in _image_tail(gpu, channels_last):
        state, alloc = op.declare_state_and_memory(state)
        if alloc is not None:  # the op writes into its own buffer; otherwise it returns a view of its input
            where = alloc.device or CPU
    assert (state.device, where) == (gpu, gpu), [type(op).__name__ for op in _image_tail(gpu, channels_last)]
    # On the CPU the batches are the same images in the requested memory format.
    images = [next(iter(val_loader(synthetic_files.val, res=32, batch_size=8, num_workers=1, device=CPU, rank=0,
                                   world_size=1, channels_last=cl, jit=False)))[0]
              for cl in (channels_last, not channels_last)]
    assert images[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(images[0], images[1]) and images[0].shape == (8, 3, 32, 32)


def test_the_other_processes_wait_for_the_writer_by_polling_not_in_a_collective(tmp_path, monkeypatch):
    """A non-writing process, told by the broadcast that the writer writes (and which cache), polls for the
    manifest and says so; it goes on once the writer has published it, and gives up after data.wait_minutes
    naming the setting. Two threads play the two processes; the broadcast hands the writer's answer over."""
    import threading
    import time

    import trainer.data.prepare as prepare

    monkeypatch.setattr(prepare, "_POLL_S", 0.02)
    d = load_config([*TINY, "data.synthetic_train_size=64", "data.synthetic_val_size=32",
                     f"data.beton_dir={tmp_path}"]).data
    said, got, sent, answered = [], {}, [], threading.Event()

    def writers_broadcast(answer):  # returns once the other process waits: the order is then certain
        sent.append(answer)
        answered.set()
        while not said and waiting.is_alive():
            time.sleep(0.01)
        return answer

    def others_broadcast(_):
        answered.wait(60)
        return sent[0]

    waiting = threading.Thread(target=lambda: got.update(files=prepare_data(
        d, is_writer=False, broadcast=others_broadcast, log=lambda m: None, say_waiting=said.append)))
    waiting.start()
    written = prepare_data(d, is_writer=True, broadcast=writers_broadcast, log=lambda m: None)
    waiting.join(60)
    assert got["files"] == written and said[0].startswith("waiting for the main process to write"), said
    assert sent[0]["writes"] and written.train.name.startswith(sent[0]["key"])

    d.beton_dir = str(tmp_path / "never_written")
    d.wait_minutes = 0.001
    with pytest.raises(DataError, match=r"did not finish writing the betons within data.wait_minutes=0.001"):
        prepare_data(d, is_writer=False, broadcast=lambda _: sent[0], say_waiting=lambda m: None)


def test_only_the_writer_lists_the_image_folder(tmp_path, monkeypatch):
    """The other processes learn the cache key from the writer's broadcast and the classes and counts from its
    manifest: they never list the tree (for ImageNet 1.28 M entries per process on a shared filesystem).
    Here the tree is gone, and the scan function counts its calls, when the other process prepares; and a
    tree the writer cannot use stops the other process too, with the writer's one line."""
    import trainer.data.prepare as prepare

    root = write_image_folder(tmp_path / "tree", per_class=5, num_classes=3, size=32)
    d = load_config(["data=imagefolder", f"data.train_dir={root}", f"data.beton_dir={tmp_path / 'b'}",
                     "data.val_fraction=0.2", "data.write_workers=1", "log.progress=false"]).data
    sent, said = [], []
    written = prepare_data(d, is_writer=True, broadcast=lambda a: sent.append(a) or a, log=said.append,
                           progress=False)
    assert [m for m in said if m.startswith(f"listed 15 images in 3 classes under {root}")], said
    assert [m for m in said if "-train.beton: written 12/12 images in" in m], said  # the write's last line
    # A process alone that only reads (the default broadcast answers nothing) lists the tree itself.
    assert prepare_data(d, is_writer=False, log=lambda m: None, progress=False) == written

    scans = []
    scan = prepare.scan_image_folder
    monkeypatch.setattr(prepare, "scan_image_folder", lambda *a, **k: scans.append(a) or scan(*a, **k))
    root.rename(tmp_path / "moved")  # listing it now fails: "no such directory"
    other = prepare_data(d, is_writer=False, broadcast=lambda _: sent[0], log=lambda m: None, progress=False)
    assert other == written and other.classes == ("class_0", "class_1", "class_2") and scans == []

    with pytest.raises(DataError, match="no such directory") as writers:
        prepare_data(d, is_writer=True, broadcast=lambda a: sent.append(a) or a, log=lambda m: None)
    with pytest.raises(DataError) as others:
        prepare_data(d, is_writer=False, broadcast=lambda _: sent[-1], log=lambda m: None)
    assert str(others.value) == str(writers.value) and len(scans) == 1  # the writer's scan only


def test_the_write_progress_says_images_per_second_and_the_time_left():
    """The beton writer's progress lines (FFCV's own bar is one carriage-returned line in a SLURM log), from a
    fake clock: a line every 30 s at the average rate since the start, and one at the end."""
    from trainer.data.write_progress import WriteProgress

    now, lines = [1000.0], []
    progress = WriteProgress(100_000, lines.append, label="a-train.beton: ", every_s=30, clock=lambda: now[0])
    for t, done in ((10, 1000), (30, 3000), (45, 4500), (61, 6100), (3000, 99_000)):
        now[0] = 1000.0 + t
        progress.update(done - progress.done)
    now[0] = 1000.0 + 3600 * 1.5
    progress.update(1000)
    progress.close()
    assert lines == ["a-train.beton: written 3000/100000 images, 100 img/s, ETA 16:10",
                     "a-train.beton: written 6100/100000 images, 100 img/s, ETA 15:39",  # 31 s after the first
                     "a-train.beton: written 99000/100000 images, 33 img/s, ETA 00:30",
                     "a-train.beton: written 100000/100000 images in 1:30:00, 19 img/s"]
