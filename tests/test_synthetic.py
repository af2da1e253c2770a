"""Tests for the embedded synthetic dataset (trainer/data/synthetic.py).

Besides the API contract (determinism, dtype/shape, balance, argument checks) this checks
that the data is actually *learnable* and that colour alone does not solve it - the two
properties the rest of the project relies on when it uses this dataset as a stand-in for
ImageNet.  Whole file: ~10 s of test time (plus importing torch) on a 2-core CPU.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.data.synthetic import MAX_CLASSES, SyntheticImages


def _stack(ds: SyntheticImages, indices=None) -> tuple[np.ndarray, np.ndarray]:
    indices = range(len(ds)) if indices is None else indices
    xs, ys = zip(*(ds[i] for i in indices))
    return np.stack(xs), np.asarray(ys)


# --------------------------------------------------------------------------------------
# API contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_item_format(image_size):
    ds = SyntheticImages(25, image_size=image_size, num_classes=10, seed=3)
    assert len(ds) == 25
    assert len(ds.classes) == 10 and len(set(ds.classes)) == 10
    assert all(isinstance(c, str) and c for c in ds.classes)
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, np.ndarray)
        assert img.shape == (image_size, image_size, 3)
        assert img.dtype == np.uint8
        assert img.flags["C_CONTIGUOUS"]
        assert type(label) is int and 0 <= label < 10
    # Not degenerate: real contrast in every image.
    assert int(img.max()) - int(img.min()) > 60


def test_same_seed_and_index_is_byte_identical_and_order_independent():
    a = SyntheticImages(50, image_size=32, seed=7)
    b = SyntheticImages(50, image_size=32, seed=7)
    # Generate b in reverse order, and one item twice: items must not depend on any
    # shared RNG stream (FFCV writer workers call __getitem__ in arbitrary order).
    rev = {i: b[i] for i in reversed(range(50))}
    for i in range(50):
        img_a, lab_a = a[i]
        img_b, lab_b = rev[i]
        assert lab_a == lab_b
        assert img_a.tobytes() == img_b.tobytes()
    assert a[13][0].tobytes() == a[13][0].tobytes()
    # Item i does not depend on the dataset length either.
    c = SyntheticImages(10, image_size=32, seed=7)
    assert c[9][0].tobytes() == a[9][0].tobytes()


def _render_bytes(args):
    seed, i = args
    return SyntheticImages(100, image_size=32, seed=seed)[i][0].tobytes()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_worker_processes_produce_identical_items():
    # The FFCV writer renders items in worker processes; they must match the parent.
    ds = SyntheticImages(100, image_size=32, seed=5)
    jobs = [(5, i) for i in (97, 3, 50, 0, 21, 64)]
    with mp.get_context("fork").Pool(2) as pool:
        remote = pool.map(_render_bytes, jobs)
    assert remote == [ds[i][0].tobytes() for _, i in jobs]


def test_different_seeds_and_indices_differ():
    a = SyntheticImages(20, image_size=32, seed=0)
    b = SyntheticImages(20, image_size=32, seed=1)
    for i in range(20):
        assert a[i][1] == b[i][1]  # labels depend only on i
        assert a[i][0].tobytes() != b[i][0].tobytes()
    # Distinct items within one seed are distinct images too.
    imgs = {a[i][0].tobytes() for i in range(20)}
    assert len(imgs) == 20


def test_negative_index_and_out_of_range():
    ds = SyntheticImages(5, image_size=16, seed=0)
    assert ds[-1][0].tobytes() == ds[4][0].tobytes()
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]


@pytest.mark.parametrize("num_images,num_classes", [(100, 10), (101, 10), (7, 3), (57, 20), (40, 2)])
def test_labels_balanced(num_images, num_classes):
    ds = SyntheticImages(num_images, image_size=16, num_classes=num_classes)
    labels = np.array([ds.label(i) for i in range(num_images)])
    # label() must agree with __getitem__ (spot check: rendering every item is slow-ish).
    for i in range(0, num_images, 7):
        assert ds[i][1] == labels[i]
    counts = np.bincount(labels, minlength=num_classes)
    assert counts.sum() == num_images
    assert counts.max() - counts.min() <= 1


def test_many_classes_have_distinct_definitions():
    ds = SyntheticImages(MAX_CLASSES, image_size=16, num_classes=MAX_CLASSES)
    assert len(set(ds.classes)) == MAX_CLASSES
    # And every class renders.
    for i in range(MAX_CLASSES):
        assert ds[i][1] == i


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_images=0),
        dict(num_images=-3),
        dict(image_size=15),
        dict(image_size=0),
        dict(num_classes=1),
        dict(num_classes=0),
        dict(num_classes=MAX_CLASSES + 1),
        dict(seed=-1),
        dict(num_images=10.0),
        dict(image_size="64"),
        dict(num_classes=True),
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    args = dict(num_images=10, image_size=32, num_classes=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        SyntheticImages(**args)


# --------------------------------------------------------------------------------------
# Learnability: a tiny CNN must learn it; mean colour must not be enough.
# --------------------------------------------------------------------------------------

N_TRAIN, N_VAL, SIZE, CLASSES = 2000, 1000, 32, 10


@pytest.fixture(scope="module")
def splits():
    # Train and val come from different seeds, exactly as the trainer uses the dataset.
    xtr, ytr = _stack(SyntheticImages(N_TRAIN, SIZE, CLASSES, seed=1))
    xva, yva = _stack(SyntheticImages(N_VAL, SIZE, CLASSES, seed=2))
    return xtr, ytr, xva, yva


def _mean_colour_nearest_centroid_acc(xtr, ytr, xva, yva) -> float:
    ftr = xtr.reshape(len(xtr), -1, 3).mean(1)
    fva = xva.reshape(len(xva), -1, 3).mean(1)
    centroids = np.stack([ftr[ytr == c].mean(0) for c in range(CLASSES)])
    pred = ((fva[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yva).mean())


def _train_tiny_cnn(xtr, ytr, xva, yva, epochs: int = 5) -> float:
    torch.manual_seed(0)

    def to_tensor(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).sub(0.5)

    xt, yt = to_tensor(xtr), torch.from_numpy(ytr).long()
    xv, yv = to_tensor(xva), torch.from_numpy(yva).long()
    w = 16
    # Global *max* pool at the end: position-invariant "is this feature present anywhere",
    # which suits a randomly placed object.
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(2 * w, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for b in range(0, len(xt), 64):
            idx = perm[b : b + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(xv).argmax(1) == yv).float().mean())


def test_mean_colour_alone_is_not_enough(splits):
    acc = _mean_colour_nearest_centroid_acc(*splits)
    # Observed 0.23 (chance = 0.10): colour carries some signal, as it should, but the
    # four colour families are shared between the 10 classes.
    assert 0.10 < acc < 0.40, acc


def test_tiny_cnn_learns_the_task(splits):
    colour_acc = _mean_colour_nearest_centroid_acc(*splits)
    cnn_acc = _train_tiny_cnn(*splits)
    # Observed 0.81 held-out after 5 epochs (~5 s on 2 CPU cores); other torch seeds gave
    # 0.75-0.81.  Threshold 0.5 leaves a wide margin while still failing on noise or on
    # classes that differ only in colour statistics.
    assert cnn_acc > 0.5, cnn_acc
    # The CNN must beat the mean-colour baseline by a clear margin (observed +0.58), i.e.
    # it really uses shape/texture.
    assert cnn_acc > colour_acc + 0.25, (cnn_acc, colour_acc)
