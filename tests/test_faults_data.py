"""Faults injected for real, the data cases of issue 18: images in every format and colour mode a real
ImageFolder holds (CMYK, greyscale, palette, PNG under a .jpg name, EXIF rotation, 16-bit), files that
cannot be decoded at all, a damaged .beton and the temporary file of a killed writer.

No training: tiny trees written with Pillow under tmp_path, `prepare_data` called directly, and the betons
read back byte for byte (write_mode=raw stores the decoded pixels as they are).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, child_env, write_image_folder
from trainer.config import load_config
from trainer.data import DataError, prepare_data, prepare_eval_data, scan_image_folder, split_per_class
from trainer.data.beton import TEMP_GLOB
from trainer.data.imagefolder import decode_error, decode_rgb

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _cfg(root: Path, betons: Path, *extra: str):
    return load_config(["data=imagefolder", f"data.train_dir={root}", f"data.beton_dir={betons}",
                        "data.val_fraction=0.25", "data.num_workers=1", "log.progress=false", *extra]).data


_SENT: dict[str, object] = {}  # the writer's last broadcast per cache folder


def _broadcast(d, is_writer: bool):
    """The job's broadcast, played in one process: the writer's answer (cache key, whether it writes) is kept,
    and a later call as another process of that job (`is_writer=False`) receives it."""
    def broadcast(answer):
        if is_writer:
            _SENT[d.beton_dir] = answer
        return _SENT[d.beton_dir]
    return broadcast


def _prepare(d, log=None, is_writer=True):
    return prepare_data(d, is_writer=is_writer, broadcast=_broadcast(d, is_writer), log=log or (lambda m: None),
                        progress=False)


@contextlib.contextmanager
def _within(seconds: int):
    """Fail instead of hanging: FFCV's writer waits for ever for a worker that died."""
    def hung(*_):
        raise TimeoutError(f"still writing after {seconds} s: the beton writer hangs")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _beton_images(path: Path) -> list[np.ndarray]:
    """The images of a raw-mode .beton in record order, read from the file itself."""
    from ffcv.reader import Reader
    r = Reader(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for record in r.metadata:
        image, index = record["f0"], int(record["f2"])
        assert image["mode"] == 1  # raw
        h, w, ptr = int(image["height"]), int(image["width"]), int(image["data_ptr"])
        out[index] = np.array(data[ptr:ptr + h * w * 3]).reshape(h, w, 3)
    assert sorted(out) == list(range(len(out)))
    return [out[i] for i in range(len(out))]


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])
    return path


def _odd_images(folder: Path) -> dict[str, np.ndarray]:
    """One file of each hard kind in `folder`, with the RGB pixels it must decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {}
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red, in ink
    want["cmyk.jpg"] = np.full((32, 32, 3), RED, np.uint8)
    Image.new("L", (32, 32), 100).save(folder / "grey.jpg", quality=95)
    want["grey.jpg"] = np.full((32, 32, 3), 100, np.uint8)
    Image.new("RGB", (32, 32), BLUE).save(folder / "png_named.jpg", format="PNG")
    want["png_named.jpg"] = np.full((32, 32, 3), BLUE, np.uint8)
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    want["palette.png"] = np.full((32, 32, 3), (10, 200, 30), np.uint8)
    # Stored 40 wide and 20 high, left half red, right half blue, EXIF orientation 6 (display rotated 90 degrees
    # clockwise): upright it is 20 wide and 40 high, red on top.
    sideways = np.zeros((20, 40, 3), np.uint8)
    sideways[:, :20], sideways[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    want["exif_rotated.jpg"] = np.rot90(sideways, k=-1)
    # 16 bits: every pixel's top byte is its 8-bit value; Pillow's own convert("RGB") clips these to 255.
    top = (np.arange(32 * 32) % 256).astype(np.uint16).reshape(32, 32)
    Image.fromarray(top * 256 + 255).save(folder / "sixteen_bit.png")
    want["sixteen_bit.png"] = np.repeat(top.astype(np.uint8)[:, :, None], 3, axis=2)
    return want


def test_every_colour_mode_and_format_is_written_as_its_rgb_pixels(tmp_path):
    """CMYK and greyscale JPEGs, a palette PNG, a PNG named .jpg, an EXIF-rotated JPEG and a 16-bit PNG: each
    decodes to its true RGB pixels, and the beton holds every image, byte for byte as decoded."""
    root = write_image_folder(tmp_path / "train", per_class=3, num_classes=2)
    want = _odd_images(root / "class_0")
    assert Image.open(root / "class_0" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "class_0" / "sixteen_bit.png").mode.startswith("I")
    for name, pixels in want.items():
        got = decode_rgb(root / "class_0" / name)
        assert got.dtype == np.uint8 and got.shape == pixels.shape, name
        if name == "exif_rotated.jpg":  # JPEG blurs the colour edge between the halves: compare away from it
            got, pixels = got[np.r_[0:16, 24:40]], pixels[np.r_[0:16, 24:40]]
        lossy = name.endswith(".jpg") and name != "png_named.jpg"
        assert np.abs(got.astype(int) - pixels).max() <= (12 if lossy else 0), name
    val = write_image_folder(tmp_path / "val", per_class=1, num_classes=2)  # a val tree: train keeps scan order
    files = _prepare(_cfg(root, tmp_path / "b", f"data.val_dir={val}"))
    paths = scan_image_folder(root).paths
    assert files.num_train == len(paths) == 6 + len(want)
    written = _beton_images(files.train)
    for path, image in zip(paths, written):
        assert np.array_equal(image, decode_rgb(path)), path


def test_an_undecodable_image_is_named_in_one_line(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=4, num_classes=2)
    bad = _truncated_jpeg(root / "class_1" / "truncated.jpg")
    assert decode_error(bad) is not None
    with _within(60), pytest.raises(DataError) as e:
        _prepare(_cfg(root, tmp_path / "b"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{bad}: cannot decode this image (")
    assert "data.bad_images=skip" in message
    assert not list((tmp_path / "b").glob("*.json")) and not list((tmp_path / "b").glob(TEMP_GLOB))
    garbage = root / "class_0" / "garbage.jpg"  # not an image at all
    garbage.write_bytes(os.urandom(300))
    bad.unlink()
    with _within(60), pytest.raises(DataError, match=rf"^{re.escape(str(garbage))}: cannot decode this image "
                                                     rf"\(UnidentifiedImageError"):
        _prepare(_cfg(root, tmp_path / "b"))


def test_skip_leaves_undecodable_images_out_after_the_split(tmp_path):
    """data.bad_images=skip: the truncated JPEG is left out, counted and listed in the manifest; the split
    and the other images are those the default setting would use; the setting has its own cache key."""
    root = write_image_folder(tmp_path / "train", per_class=4, num_classes=2)
    bad = str(_truncated_jpeg(root / "class_1" / "truncated.jpg"))
    said = []
    # two processes: the check before writing decodes in parallel
    files = _prepare(_cfg(root, tmp_path / "b", "data.bad_images=skip", "data.write_workers=2"), log=said.append)
    assert files.num_train + files.num_val == 8
    manifest = json.loads(files.train.with_name(files.train.name.replace("-train.beton", ".json")).read_text())
    assert [b["path"] for b in manifest["bad_images"]] == [bad]
    assert "truncated" in manifest["bad_images"][0]["error"].lower()
    assert manifest["spec"]["bad_images"] == "skip"
    assert [m for m in said if "left out 1 of 9 images" in m], said
    # The split is the one of the whole tree, bad file included, less the bad file: it did not shift.
    train, val = split_per_class(scan_image_folder(root), 0.25, seed=0)
    for beton, images in ((files.train, train), (files.val, val)):
        kept = [p for p in images.paths if p != bad]
        assert [decode_rgb(p).tobytes() for p in kept] == [a.tobytes() for a in _beton_images(beton)]
    # The default setting is another cache entry, and names the file.
    with _within(60), pytest.raises(DataError, match="truncated.jpg: cannot decode"):
        _prepare(_cfg(root, tmp_path / "b"))


def test_a_damaged_beton_is_named_in_one_line_and_rewritten_once_deleted(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=4, num_classes=2)
    d = _cfg(root, tmp_path / "b")
    files = _prepare(d)
    manifest = files.train.with_name(files.train.name.replace("-train.beton", ".json"))
    entries = json.loads(manifest.read_text())["betons"]
    assert entries[files.train.name]["size"] == files.train.stat().st_size

    index_end = entries[files.train.name]["index_ranges"][0][1]  # the end of the per-sample metadata table
    with open(files.train, "r+b") as f:
        f.seek(index_end - 16)
        f.write(bytes(b ^ 0xFF for b in f.read(8)))
    with pytest.raises(DataError) as e:
        _prepare(d, is_writer=False)  # every process checks, not only the writer
    assert str(e.value) == (f"{files.train}: damaged .beton (the checksum of its header and index differs from the "
                            f"manifest's); delete it and the next run writes it again")
    files.train.unlink()
    val_written = files.val.stat().st_mtime_ns
    again = _prepare(d)
    assert (again.num_train, again.num_val) == (files.num_train, files.num_val)
    assert files.val.stat().st_mtime_ns == val_written  # only the deleted file was written again

    size = files.val.stat().st_size
    with open(files.val, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match=rf"^{re.escape(str(files.val))}: damaged .beton \({size - 100} bytes, the "
                                        rf"manifest records {size}\); delete it and the next run writes it again$"):
        _prepare(d)


def test_an_eval_beton_is_checked_too(tmp_path):
    """stage=eval with data.val_dir writes its own beton, with a manifest of its own."""
    val = write_image_folder(tmp_path / "val", per_class=2, num_classes=2)
    _truncated_jpeg(val / "class_0" / "truncated.jpg")
    d = _cfg(val, tmp_path / "b", f"data.val_dir={val}", "data.bad_images=skip")
    files = prepare_eval_data(d, ("class_0", "class_1"), is_writer=True, broadcast=_broadcast(d, True),
                              log=lambda m: None, progress=False)
    assert files.num_val == 4 and len(_beton_images(files.val)) == 4
    manifest = json.loads(files.val.with_name(files.val.name.replace("-val.beton", ".json")).read_text())
    assert [Path(b["path"]).name for b in manifest["bad_images"]] == ["truncated.jpg"]
    with open(files.val, "r+b") as f:
        f.write(b"\xff" * 8)  # the header
    with pytest.raises(DataError, match=rf"^{re.escape(str(files.val))}: damaged .beton \(the checksum"):
        prepare_eval_data(d, ("class_0", "class_1"), is_writer=False, broadcast=_broadcast(d, False),
                          log=lambda m: None)


def test_a_manifest_from_before_the_checks_is_accepted(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=4, num_classes=2)
    d = _cfg(root, tmp_path / "b")
    files = _prepare(d)
    manifest = files.train.with_name(files.train.name.replace("-train.beton", ".json"))
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in ("betons", "bad_images")}
    manifest.write_text(json.dumps(old))
    with open(files.train, "ab") as f:  # unchecked: such a manifest records no size
        f.write(b"\0")
    assert _prepare(d, is_writer=False).num_train == files.num_train
    assert json.loads(manifest.read_text()) == old  # read as it is, not rewritten


def _locked(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_stale_temp_files_are_removed_by_the_next_write_locked_ones_kept(tmp_path):
    betons = tmp_path / "b"
    betons.mkdir()
    stale = betons / ".old-train.beton.4242.tmp"  # its writer is gone: nothing holds its lock
    stale.write_bytes(b"\0" * 4096)
    live = betons / ".other-train.beton.4343.tmp"  # a writer (here: this test) still holds it
    live.write_bytes(b"\0" * 4096)
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        said = []
        _prepare(_cfg(write_image_folder(tmp_path / "train", per_class=4, num_classes=2), betons), log=said.append)
        assert not stale.exists() and live.exists()
        assert [m for m in said if m.startswith(f"removed {stale}")], said
    assert sorted(p.name for p in betons.glob(TEMP_GLOB)) == [live.name]


_SLOW_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from trainer.data.beton import image_field, write_beton

class Slow:
    def __len__(self):
        return 600
    def __getitem__(self, i):
        time.sleep(0.05)
        return np.zeros((8, 8, 3), np.uint8), 0, i

write_beton(Slow(), Path(sys.argv[1]), image_field("raw", None, 90, 0.5), num_workers=1)
"""


def test_a_killed_writers_temp_file_is_removed_a_live_ones_kept(tmp_path):
    """A real writer in another process: its temporary file survives another write while it runs, and is
    removed by the next write once the writer is SIGKILLed, though its FFCV worker still runs (the lock is
    the writer's, not its children's)."""
    betons = tmp_path / "b"
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(betons / "slow-train.beton")], cwd=REPO,
                              env=child_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        tmp = betons / f".slow-train.beton.{writer.pid}.tmp"
        deadline = time.time() + 60
        while not (tmp.exists() and _locked(tmp)):
            assert writer.poll() is None and time.time() < deadline, writer.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        root = write_image_folder(tmp_path / "train", per_class=4, num_classes=2)
        _prepare(_cfg(root, betons))
        assert tmp.exists() and writer.poll() is None  # written alongside a live writer: its file kept

        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        os.killpg(writer.pid, 0)  # its FFCV worker still runs (raises ProcessLookupError if not)
        assert tmp.exists()
        said = []
        _prepare(_cfg(root, betons, "data.val_fraction=0.5"), log=said.append)  # the next write
        assert not tmp.exists() and not list(betons.glob(TEMP_GLOB))
        assert [m for m in said if m.startswith(f"removed {tmp}")], said
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(writer.pid, signal.SIGKILL)  # the writer's session: its orphaned FFCV worker
        writer.wait(timeout=10)
