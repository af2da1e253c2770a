#!/usr/bin/env python
"""Training-loader throughput: the project's FFCV loader against torchvision ImageFolder + DataLoader.

    python benchmarks/loader.py [--data DIR] [--res 160 224] [--workers N] [--batch-size 128]
                                [--repeats 3] [--warmup 5] [--batches N] [--modes raw jpg] [--profile]
                                [--beton-dir ~/.cache/vp-prune/betons] [--out loader.json]

Without --data the Imagenette training split is extracted from
../shared/data/imagenette-train.tar (next to the repository) into a temporary
folder that is removed at exit.

What is compared, at each resolution:

  ffcv-raw     the trainer's own TrainLoader (trainer/data/loaders.py) reading a
               .beton written by the trainer's own writer (trainer/data/beton.py)
               with the project's default data.write_mode=raw: pixels stored
               decoded, so the loader only crops + resizes (OpenCV) + flips
  ffcv-jpg     the same loader on a .beton written with write_mode=jpg (every image
               re-encoded at data.jpeg_quality=90): the loader decodes JPEGs with
               libjpeg-turbo first
  torchvision  torchvision.datasets.ImageFolder (PIL decode of the original JPEG files)
               + RandomResizedCrop(res, scale=(min_crop_scale, 1)) + RandomHorizontalFlip
               + PILToTensor, batched by torch.utils.data.DataLoader (worker processes)

The augmentation is the trainer's: random-resized-crop with area fraction in
[data.min_crop_scale, 1] = [0.35, 1] and the default aspect ratios (3/4, 4/3),
then a horizontal flip with probability 1/2. Both sides end at the same point:
a uint8 NCHW contiguous batch on the CPU, which is what the trainer's FFCV
pipeline delivers on a CPU-only machine (decode -> ToTensor -> ToDevice -> ToTorchImage, no
normalisation: the model normalises, after the visual prompt). Hence
PILToTensor (uint8) and not ToTensor (float) on the torchvision side. The
resampling differs and is part of what is measured: FFCV resizes the crop with
OpenCV (INTER_AREA), torchvision with PIL bilinear + antialias.

Both sides get the same worker count (FFCV: decoding threads in this process;
torchvision: worker processes), the same batch size, a shuffled order and
drop_last. One "run" starts a fresh epoch iterator, takes --warmup batches
untimed (worker start-up, first reads), then times --batches batches (default:
the rest of the epoch) and reports images/s over that window. The three loaders
run in turns within every repeat (order reversed on odd repeats), so load from
other processes hits all alike; the median over repeats is reported. FFCV's
numba compilation happens in one untimed run per loader before the repeats;
its cost is reported separately, as are the .beton writes (done once, cached
under --beton-dir).

Besides images/s, every run records the CPU time it cost (this process plus
its reaped workers) per delivered image and the cores it kept busy: on a shared
machine the throughput follows the CPU share the scheduler grants, the CPU
cost per image much less.

--profile adds the CPU time per image of each piece, called on one thread
(file read, PIL decode, PIL crop+resize+flip+to-tensor, a whole ImageFolder
__getitem__, default_collate, libjpeg-turbo decode as FFCV calls it on the
original and on the q90 re-encoded JPEGs, FFCV's OpenCV crop-resize + flip,
FFCV's batch copies), to explain the throughput numbers.

torchvision's workers are forked (the Linux default) from a process whose numba
TBB thread pool is running; numba then prints "Unable to join threads to shut
down before fork()". The workers never call numba, so it is harmless here.

Prints a table and writes JSON (--out) with machine info.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402

SHARED_TAR = ROOT.parent / "shared" / "data" / "imagenette-train.tar"


def find_data(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    if not SHARED_TAR.parent.is_dir():
        sys.exit(f"error: {SHARED_TAR.parent} not found; pass --data DIR (an ImageFolder train dir, <DIR>/<class>/<image>)")
    if not SHARED_TAR.is_file():
        sys.exit(f"error: {SHARED_TAR} not found; pass --data DIR (an ImageFolder train dir, <DIR>/<class>/<image>)")
    tmp = Path(tempfile.mkdtemp(prefix="vp-prune-loader-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    t0 = time.perf_counter()
    with tarfile.open(SHARED_TAR) as tar:
        tar.extractall(tmp, filter="data")
    print(f"extracted {SHARED_TAR.name} to {tmp} in {time.perf_counter() - t0:.1f}s")
    return tmp / "train"


def content_key(images) -> str:
    """Relative paths, sizes and labels: a re-extracted copy of the same tree reuses its .beton."""
    h = hashlib.sha1()
    root = Path(images.paths[0]).parents[1]
    for p, y in zip(images.paths, images.labels):
        h.update(f"{Path(p).relative_to(root)}\0{os.path.getsize(p)}\0{y}\n".encode())
    return h.hexdigest()[:12]


def ensure_beton(images, mode: str, d, beton_dir: Path, workers: int) -> tuple[Path, float | None]:
    from trainer.data.beton import cache_key, image_field, write_beton
    from trainer.data.imagefolder import ImageListDataset
    key = cache_key(kind="bench-loader", content=content_key(images), count=len(images), write_mode=mode,
                    max_resolution=d.max_resolution, jpeg_quality=d.jpeg_quality,
                    compress_probability=d.compress_probability)
    path = beton_dir / f"bench-loader-{key}-{mode}.beton"
    if path.exists():
        return path, None
    print(f"writing {len(images)} images to {path} (write_mode={mode}, not timed as loading)", flush=True)
    t0 = time.perf_counter()
    write_beton(ImageListDataset(images), path,
                image_field(mode, d.max_resolution, d.jpeg_quality, d.compress_probability), num_workers=workers)
    return path, time.perf_counter() - t0


class FFCVSide:
    def __init__(self, path: Path, res: int, args, d):
        from trainer.data.loaders import TrainLoader
        self.loader = TrainLoader(path, res=res, batch_size=args.batch_size, num_workers=args.workers,
                                  seed=args.seed, device=torch.device("cpu"), min_crop_scale=d.min_crop_scale,
                                  augment=True, channels_last=False)
        self.epoch = 0

    def start(self):
        self.epoch += 1
        return self.loader.epoch(self.epoch)

    @staticmethod
    def finish(it) -> None:
        it.close()
        it.join(timeout=60)  # it computes at most batches_ahead more batches, off the clock

    def __len__(self) -> int:
        return len(self.loader)


class TorchvisionSide:
    def __init__(self, data: Path, res: int, args, d):
        from torchvision import datasets, transforms
        tf = transforms.Compose([transforms.RandomResizedCrop(res, scale=(d.min_crop_scale, 1.0)),
                                 transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
        self.dataset = datasets.ImageFolder(str(data), transform=tf)
        self.args = args
        self.epoch = 0

    def start(self):
        self.epoch += 1
        g = torch.Generator().manual_seed(self.args.seed * 1000 + self.epoch)
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.args.batch_size, shuffle=True,
                                         num_workers=self.args.workers, drop_last=True, generator=g,
                                         pin_memory=False, persistent_workers=False)
        self.n = len(dl)
        return iter(dl)

    @staticmethod
    def finish(it) -> None:
        it._shutdown_workers()  # join now, so no prefetching overlaps the next loader's run

    def __len__(self) -> int:
        return len(self.dataset) // self.args.batch_size


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(side, res: int, warmup: int, batches: int | None, batch_size: int) -> dict:
    """One run: fresh epoch iterator, `warmup` untimed batches, then `batches` timed ones."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    it = side.start()
    stamps = []
    last = warmup + batches if batches else None
    for i, batch in enumerate(it):
        stamps.append(time.perf_counter())
        if i == 0:
            x = batch[0]
            ok = (tuple(x.shape) == (batch_size, 3, res, res) and x.dtype == torch.uint8 and x.is_contiguous()
                  and x.device.type == "cpu")
            if not ok:
                raise RuntimeError(f"{type(side).__name__}: batch {tuple(x.shape)} {x.dtype} "
                                   f"contiguous={x.is_contiguous()} on {x.device}, expected uint8 NCHW on cpu")
        if last is not None and i + 1 >= last:
            break
    side.finish(it)
    cpu = cpu_seconds() - c0
    wall = time.perf_counter() - t0
    timed = len(stamps) - warmup
    if timed < 1:
        raise RuntimeError(f"only {len(stamps)} batches in an epoch; lower --warmup")
    window = stamps[-1] - stamps[warmup - 1]
    return {"images_per_s": timed * batch_size / window, "timed_batches": timed, "timed_s": window,
            "first_batch_s": stamps[0] - t0, "run_wall_s": wall,
            "run_cpu_s": cpu, "cpu_ms_per_image": 1000 * cpu / (len(stamps) * batch_size),
            "cores_used": cpu / wall}


def profile(images, res: int, d, n: int, seed: int) -> dict:
    """Per-image CPU time of each piece of both pipelines, called on one thread (ms, median of 3 passes).

    CPU time of this process (time.process_time, so a library's helper threads count
    too), not wall time: on a shared machine the wall time of a piece grows with
    everybody else's load, its CPU time much less. Run while no loader is active.
    """
    from PIL import Image
    from torchvision import transforms
    from ffcv.libffcv import imdecode, resize_crop
    import io
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    paths = [images.paths[i] for i in rng.choice(len(images), size=min(n, len(images)), replace=False)]
    files = [Path(p).read_bytes() for p in paths]
    rrc = transforms.Compose([transforms.RandomResizedCrop(res, scale=(d.min_crop_scale, 1.0)),
                              transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in files]
    for im in decoded:
        im.load()
    # The q90 re-encode that write_mode=jpg stores (encoded like FFCV's writer: OpenCV, quality 90).
    import cv2
    q90 = [cv2.imencode(".jpg", cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR),
                        [int(cv2.IMWRITE_JPEG_QUALITY), d.jpeg_quality])[1].reshape(-1) for im in decoded]
    orig = [np.frombuffer(b, dtype=np.uint8) for b in files]
    arrays = [np.ascontiguousarray(np.asarray(im)) for im in decoded]
    dst = np.empty((res, res, 3), dtype=np.uint8)
    tmp = np.empty((max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays), 3), dtype=np.uint8)
    crop_rng = np.random.default_rng(seed + 1)

    def crop_box(h, w):  # torchvision's RandomResizedCrop.get_params, numpy edition
        area = h * w
        for _ in range(10):
            target = area * crop_rng.uniform(d.min_crop_scale, 1.0)
            ar = np.exp(crop_rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(target * ar))), int(round(np.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                i, j = crop_rng.integers(0, h - ch + 1), crop_rng.integers(0, w - cw + 1)
                return int(i), int(j), ch, cw
        return 0, 0, h, w

    boxes = [crop_box(*a.shape[:2]) for a in arrays]

    def pil_open_decode():
        for b in files:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB")

    def pil_augment():
        for im in decoded:
            rrc(im)

    def read_file():  # the part of ImageFolder's pil_loader that is file I/O (page cache warm)
        for p in paths:
            with open(p, "rb") as f:
                f.read()

    def torchvision_getitem():  # ImageFolder.__getitem__: pil_loader (open file, decode, RGB) + transform
        for p in paths:
            with open(p, "rb") as f:
                im = Image.open(f).convert("RGB")
            rrc(im)

    tensors = [rrc(im) for im in decoded]
    batches = [tensors[i:i + 128] for i in range(0, len(tensors), 128)]

    def collate():
        for b in batches:
            torch.utils.data.default_collate(b)

    # FFCV's tail on a CPU batch: ToTensor (a view), ToDevice(cpu) (a copy into its own
    # buffer), ToTorchImage(channels_last=False) (NHWC -> NCHW contiguous copy).
    nhwc = torch.from_numpy(np.stack([dst] * 128))
    dev_buf, nchw_buf = torch.empty_like(nhwc), torch.empty((128, 3, res, res), dtype=torch.uint8)

    def ffcv_tail():
        for _ in range(len(files) // 128 or 1):
            dev_buf.copy_(nhwc)
            nchw_buf[:] = dev_buf.permute(0, 3, 1, 2).contiguous()

    def turbo(blobs):
        def run():
            for blob, a in zip(blobs, arrays):
                h, w = a.shape[:2]
                imdecode(blob, tmp, h, w, h, w, 0, 0, 1, 1, False, False)
        return run

    def ffcv_crop_resize():
        for a, (i, j, h, w) in zip(arrays, boxes):
            resize_crop(a, i, i + h, j, j + w, dst)
            dst[:, ::-1].copy()  # the flip's copy (FFCV copies every image, flipped or not)

    pieces = {
        "pil_decode_original_jpeg": pil_open_decode,
        "read_file": read_file,
        "pil_crop_resize_flip_to_tensor": pil_augment,
        "torchvision_imagefolder_getitem": torchvision_getitem,
        "torchvision_default_collate": collate,
        "turbojpeg_decode_original_jpeg": turbo(orig),
        "turbojpeg_decode_q90_reencoded": turbo(q90),
        "ffcv_crop_resize_flip": ffcv_crop_resize,
        "ffcv_tail_copies": ffcv_tail,
    }
    out = {"images": len(files), "res": res,
           "mean_bytes_original_jpeg": float(np.mean([len(b) for b in files])),
           "mean_bytes_q90_reencoded": float(np.mean([len(b) for b in q90])),
           "mean_bytes_raw": float(np.mean([a.nbytes for a in arrays]))}
    for name, fn in pieces.items():
        fn()  # warm
        times = []
        for _ in range(3):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        n_items = (len(files) // 128 or 1) * 128 if name == "ffcv_tail_copies" else len(files)
        out[f"{name}_ms"] = 1000 * statistics.median(times) / n_items
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ImageFolder train dir (<DIR>/<class>/<image>); default: extract "
                                       "../shared/data/imagenette-train.tar into a temporary dir")
    parser.add_argument("--res", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="FFCV decoding threads = torchvision worker processes (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches at the start of every run")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per run (default: the rest of the epoch after the warm-up); keep it a "
                             "multiple of --workers: torchvision's workers deliver their batches in bursts")
    parser.add_argument("--modes", nargs="+", default=["raw", "jpg"], choices=["raw", "jpg", "smart", "proportion"],
                        help="FFCV .beton write modes to compare (the project default is raw)")
    parser.add_argument("--no-torchvision", action="store_true", help="FFCV only (for profiling)")
    parser.add_argument("--beton-dir", default="~/.cache/vp-prune/betons",
                        help="where the .beton files are written once and cached (never inside the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also time the pipelines' pieces on one thread")
    parser.add_argument("--profile-images", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the window starts at the last warm-up batch)")

    started = time.perf_counter()
    data = find_data(args.data)
    beton_dir = Path(args.beton_dir).expanduser().resolve()
    if beton_dir == ROOT or ROOT in beton_dir.parents:
        sys.exit(f"error: --beton-dir {beton_dir} is inside the repository; data-derived files must stay out of it")

    import ffcv  # noqa: F401  (sets torch to 1 thread on import)
    import numba
    import torchvision
    from trainer.config.schema import DataConfig
    from trainer.data.imagefolder import scan_image_folder
    torch.set_num_threads(args.workers)  # FFCV's import left 1; its loaders set it to num_workers anyway

    d = DataConfig()  # the trainer's defaults: min_crop_scale, jpeg_quality, ...
    images = scan_image_folder(data)
    betons, writes = {}, {}
    for mode in args.modes:
        betons[mode], writes[mode] = ensure_beton(images, mode, d, beton_dir, args.workers)
    # Reap the writer's finished worker processes now: os.times() adds a child's CPU time when it is
    # reaped, and multiprocessing would otherwise reap them lazily inside a measured run.
    import multiprocessing
    multiprocessing.active_children()

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
                    "cpu_model": cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__, "ffcv": ffcv.__version__,
                    "numba": numba.__version__, "numpy": np.__version__,
                    "pillow": __import__("PIL").__version__,
                    "loadavg_at_start": os.getloadavg()},
        "settings": {"data": str(data), "images": len(images), "workers": args.workers,
                     "batch_size": args.batch_size, "repeats": args.repeats, "warmup_batches": args.warmup,
                     "timed_batches": args.batches, "seed": args.seed, "min_crop_scale": d.min_crop_scale,
                     "jpeg_quality": d.jpeg_quality, "max_resolution": d.max_resolution,
                     "torch_threads": torch.get_num_threads()},
        "betons": {m: {"path": str(p), "bytes": p.stat().st_size, "write_s": writes[m]} for m, p in betons.items()},
        "results": {},
    }

    for res in args.res:
        sides = {f"ffcv-{m}": FFCVSide(betons[m], res, args, d) for m in args.modes}
        if not args.no_torchvision:
            sides["torchvision"] = TorchvisionSide(data, res, args, d)
        compile_runs = {}
        for name, side in sides.items():
            if name.startswith("ffcv"):  # numba compiles the pipeline on the first epoch
                t0 = time.perf_counter()
                compile_runs[name] = measure(side, res, 1, 1, args.batch_size)
                compile_runs[name]["total_s"] = time.perf_counter() - t0
                print(f"res {res} {name}: first run (numba compile) first batch after "
                      f"{compile_runs[name]['first_batch_s']:.1f}s", flush=True)
        runs = {name: [] for name in sides}
        order = list(sides)
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                m = measure(sides[name], res, args.warmup, args.batches, args.batch_size)
                runs[name].append(m)
                print(f"res {res} repeat {r + 1}/{args.repeats} {name:<12} {m['images_per_s']:8.0f} img/s "
                      f"({m['timed_batches']} batches, first batch {m['first_batch_s']:.2f}s, "
                      f"{m['cpu_ms_per_image']:.2f} CPU-ms/img, {m['cores_used']:.2f} cores)", flush=True)
        summary = {}
        for name, ms in runs.items():
            summary[name] = {"median_images_per_s": statistics.median(m["images_per_s"] for m in ms),
                             "median_cpu_ms_per_image": statistics.median(m["cpu_ms_per_image"] for m in ms),
                             "median_first_batch_s": statistics.median(m["first_batch_s"] for m in ms),
                             "median_cores_used": statistics.median(m["cores_used"] for m in ms),
                             "runs": ms}
            if name in compile_runs:
                summary[name]["compile_run"] = compile_runs[name]
        if "torchvision" in summary:
            tv = summary["torchvision"]["median_images_per_s"]
            for name in summary:
                summary[name]["ratio_to_torchvision"] = summary[name]["median_images_per_s"] / tv
        report["results"][str(res)] = summary

    if args.profile:
        report["profile"] = {str(res): profile(images, res, d, args.profile_images, args.seed) for res in args.res}
        torch.set_num_threads(args.workers)

    print()
    print(f"{len(images)} images, batch {args.batch_size}, {args.workers} workers, "
          f"median of {args.repeats} interleaved runs ({args.warmup} warm-up batches, "
          f"{'rest of epoch' if args.batches is None else f'{args.batches} batches'} timed), "
          f"{os.cpu_count()} CPUs: {cpu_model()}")
    print(f"{'res':>4}  {'loader':<12}{'images/s':>10}{'vs torchvision':>16}{'CPU-ms/img':>12}{'cores used':>12}"
          f"{'first batch s':>15}{'compile s':>11}")
    for res, summary in report["results"].items():
        for name, s in summary.items():
            ratio = s.get("ratio_to_torchvision")
            compile_s = f"{s['compile_run']['first_batch_s']:.1f}" if "compile_run" in s else "-"
            print(f"{res:>4}  {name:<12}{s['median_images_per_s']:>10.0f}"
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>16}{s['median_cpu_ms_per_image']:>12.2f}"
                  f"{s['median_cores_used']:>12.2f}{s['median_first_batch_s']:>15.2f}{compile_s:>11}")
    print("CPU-ms/img: CPU time of this process and its workers per delivered image over whole runs "
          "(warm-up included); cores used: that CPU time / the runs' wall time; compile s: FFCV's first "
          "batch ever (numba compilation), once per loader")
    if "profile" in report:
        print()
        print("CPU time per image on one thread, ms (median of 3 passes over "
              f"{report['profile'][str(args.res[0])]['images']} images):")
        keys = [k for k in report["profile"][str(args.res[0])] if k.endswith("_ms")]
        for res, p in report["profile"].items():
            for k in keys:
                print(f"{res:>4}  {k[:-3]:<34}{p[k]:>7.2f}")
        p = report["profile"][str(args.res[0])]
        print(f"mean bytes/image: original JPEG {p['mean_bytes_original_jpeg']:.0f}, "
              f"q{d.jpeg_quality} re-encode {p['mean_bytes_q90_reencoded']:.0f}, raw {p['mean_bytes_raw']:.0f}")
    for m, b in report["betons"].items():
        print(f".beton {m}: {b['bytes'] / 2**20:.0f} MiB" + (f", written in {b['write_s']:.0f}s" if b["write_s"] else " (cached)"))
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - started
    print(f"benchmark took {report['elapsed_s']:.0f}s")
    print(f"load average (1, 5, 15 min) at start {report['machine']['loadavg_at_start']}, at end {os.getloadavg()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
