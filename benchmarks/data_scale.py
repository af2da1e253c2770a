#!/usr/bin/env python
"""Data at ImageNet scale: listing, writing and loading an ImageFolder of N small real JPEG files.

    nice -n 19 python benchmarks/data_scale.py [--sizes 100000 1280000] [--classes 1000]
                 [--root ~/.cache/vp-prune/data-scale]
                 [--res 160] [--batch-size 256] [--warmup 10] [--batches 100] [--repeats 3] [--scan-repeats 3]
                 [--write-repeats 3] [--no-jit] [--remove-trees] [--out benchmarks/results/data_scale.json]

For every N of --sizes, one after another:

  generate  <root>/n<N>/train/<class>/<class>_<i>.JPEG: N files in --classes folders (N/classes each,
            the remainder one more in the first folders), kept for the next run (a marker file
            says the tree is complete; --remove-trees deletes it after its measurements). To go fast
            the files are copies: --pool distinct 64x64 images (a smooth random colour field plus
            grain, JPEG quality 75 by PIL, 1-3 KB each) are encoded once by all cores, and every
            file is a random member of that pool, written by all cores. Repeated content saves the
            readers nothing: each file is opened, read and decoded for itself. Not a measured figure.
  scan      the project's scan_image_folder (trainer/data/imagefolder.py) on the tree, each time in a
            fresh process: seconds (median of --scan-repeats) and the process's peak RSS. The tree
            was just written or listed, so the kernel's directory cache is warm: what a second
            listing on a local disk costs, not a cold shared filesystem's.
  prepare   the project's prepare_data (what a stage's data() runs) in a job of two processes over
            gloo, as under torchrun: rank 0 lists the tree, broadcasts the cache key and writes
            the train and validation betons with every core (data.write_workers unset: the
            processes FFCV's writer forks = this machine's cores); rank 1 waits for the manifest.
            Each process counts the directory listings it makes (os.scandir, which os.walk
            uses, and os.listdir) inside the tree: rank 1 must make none. Write images/s = images
            written / seconds inside the project's write_beton (timed around it; the listing and
            the split are outside). Memory: the peak RSS of rank 0 and of rank 1, and the largest
            sum of the writer workers' private memory (sampled every 5 s: the workers are forked
            copies of rank 0, whose RSS would count rank 0's pages again). Its cache folder is
            emptied before each of --write-repeats rounds, so it writes every time; medians.
  load      the project's TrainLoader built as StageContext.train_loader builds it for data=imagenet
            at --res: seeded random-resized-crop (area 0.08-1) + flip, uint8 NCHW batches on the CPU,
            data.num_workers = this machine's cores, numba-compiled (--no-jit: not), in a fresh
            process. Seconds to build it (FFCV reads the beton's index), then --repeats epochs
            started in turn: --warmup batches untimed (the first one compiles), then --batches
            timed: images/s over that window (median over the repeats; not a whole epoch). Peak RSS,
            and at the end its anonymous and file-backed parts: the beton is memory-mapped, and the
            page-cache pages around every sample read count in the RSS (file-backed, reclaimable).

The data settings are data=imagenet's (write_mode=proportion: about half the images stored as JPEG at
quality 90, the rest raw; max_resolution=500, which leaves 64 px images as they are; a seeded 10%
validation split carved from the tree), with data.beton_dir=<root>/n<N>/betons.

Peak RSS is the phase process's VmHWM (/proc/self/status; not getrusage's ru_maxrss, which carries the
peak of the process that started it across exec); "above import" subtracts its RSS once torch and FFCV
were imported, before the work (about 610 MiB of every phase is that import).

Prints a table and how each figure grows from the smallest to the largest N, and writes JSON (--out)
with the machine, date and versions.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_PX = 64
MARKER = "complete.json"


# --------------------------------------------------------------------------- measuring a process


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    return _status_mib("VmRSS")


def rss_kinds() -> dict:
    """This process's resident memory now by kind: anonymous (its own data) and file-backed (mapped files'
    pages from the page cache, such as a memory-mapped beton: the kernel can drop them)."""
    return {"rss_anon_mib": _status_mib("RssAnon"), "rss_file_mib": _status_mib("RssFile")}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB. Not getrusage's ru_maxrss: that one carries the
    peak of the process that forked this one across exec, so every phase would show its launcher's."""
    return _status_mib("VmHWM")


class WorkersMemory:
    """The largest sum of the private memory (USS: pages no other process maps) of this process's descendants,
    sampled every `every_s` in a thread. FFCV's writer workers are forked copies of the writer: their RSS
    counts the writer's pages again, their private pages are what they add to it. Reading a worker's
    smaps_rollup walks its page tables, about 25 ms of CPU for a copy of the 1.28 M-file writer: every 5 s
    that is 1% of a core taken from the write (every 0.5 s it was 10%). Their private memory grows while
    they write (copy-on-write), so the last samples hold the peak."""

    def __init__(self, every_s: float = 5.0):
        import threading
        self.every_s, self.peak_mib, self.most = every_s, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _private_mib(pid: int) -> float:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # it ended meanwhile
            return 0.0
        private = [int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:"))]
        return sum(private) / 1024

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        found, todo = [], [pid]
        while todo:
            parent = todo.pop()
            for task in Path(f"/proc/{parent}/task").glob("*"):
                try:
                    kids = [int(k) for k in (task / "children").read_text().split()]
                except OSError:
                    continue
                found += kids
                todo += kids
        return found

    def sample(self) -> None:
        kids = self._descendants(os.getpid())
        self.most = max(self.most, len(kids))
        self.peak_mib = max(self.peak_mib, sum(self._private_mib(k) for k in kids))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class ListingCounter:
    """Counts the directory listings this process makes inside `tree` (os.scandir, which os.walk calls for
    every folder, and os.listdir); both are looked up on the os module when called, so wrapping them there
    sees every listing of the project's code."""

    def __init__(self, tree: Path):
        self.tree, self.count = str(tree), 0
        self._scandir, self._listdir = os.scandir, os.listdir

    def _seen(self, path) -> None:
        if os.path.abspath(os.fspath(path) if path is not None else ".").startswith(self.tree):
            self.count += 1

    def __enter__(self):
        def scandir(path="."):
            self._seen(path)
            return self._scandir(path)

        def listdir(path="."):
            self._seen(path)
            return self._listdir(path)
        os.scandir, os.listdir = scandir, listdir
        return self

    def __exit__(self, *exc):
        os.scandir, os.listdir = self._scandir, self._listdir


# --------------------------------------------------------------------------- generating the tree


def pool_image(seed: int) -> bytes:
    """One 64x64 JPEG (quality 75): a smooth random colour field plus grain, so that it compresses like a
    photo (1-3 KB), not like a flat colour or pure noise."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(low).resize((IMAGE_PX, IMAGE_PX), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, rng.uniform(4, 18), (IMAGE_PX, IMAGE_PX, 1)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=75)
    return out.getvalue()


_POOL: list[bytes] = []


def _write_class(job) -> int:
    folder, name, count, seed = job
    import numpy as np
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    picks = rng.integers(0, len(_POOL), count)
    for i, pick in enumerate(picks):
        with open(folder / f"{name}_{i}.JPEG", "wb") as f:
            f.write(_POOL[pick])
    return count


def generate_tree(tree_root: Path, n: int, classes: int, pool: int, seed: int, workers: int) -> dict:
    """The ImageFolder of N files under tree_root/train (reused when its marker matches); what it is."""
    want = {"images": n, "classes": classes, "pool": pool, "seed": seed, "image_px": IMAGE_PX, "quality": 75}
    marker = tree_root / MARKER
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want:
        return json.loads(marker.read_text())
    shutil.rmtree(tree_root, ignore_errors=True)
    start = time.perf_counter()
    global _POOL
    with multiprocessing.Pool(workers) as p:
        _POOL = p.map(pool_image, range(seed * 1_000_003, seed * 1_000_003 + pool), chunksize=64)
    with multiprocessing.Pool(workers) as p:  # forked after _POOL is set: every worker has the pool
        jobs = [(tree_root / "train" / f"n{c:08d}", f"n{c:08d}", n // classes + (c < n % classes), seed * 7919 + c)
                for c in range(classes)]
        written = sum(p.imap_unordered(_write_class, jobs, chunksize=max(1, classes // (8 * workers))))
    info = {**want, "written": written, "seconds": time.perf_counter() - start,
            "pool_mean_bytes": sum(map(len, _POOL)) / len(_POOL)}
    marker.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- the phases (each its own process)


def data_config(tree: Path, betons: Path, res: int, batch: int, jit: bool):
    from trainer.config import load_config
    return load_config(["data=imagenet", f"data.train_dir={tree}", f"data.beton_dir={betons}", f"data.res={res}",
                        f"data.batch_size={batch}", f"data.num_workers={len(os.sched_getaffinity(0))}",
                        f"data.jit={str(jit).lower()}", "log.progress=false"]).data


def phase_scan(a: dict) -> dict:
    from trainer.data.imagefolder import scan_image_folder
    base = rss_mib()
    start = time.perf_counter()
    with ListingCounter(Path(a["tree"])) as listings:
        images = scan_image_folder(a["tree"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(images), "classes": len(images.classes), "listings": listings.count,
            "peak_rss_mib": peak_rss_mib(), "rss_after_import_mib": base, **rss_kinds()}


def phase_prepare(a: dict) -> dict:
    """One process of a two-process job running prepare_data, as a stage's data() does."""
    import torch.distributed as dist

    import trainer.data.prepare as prepare

    rank = a["rank"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a['port']}", rank=rank, world_size=a["world"])

    def broadcast(obj):  # = Engine.broadcast_object
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    writes = []
    write_beton = prepare.write_beton

    def timed_write(records, path, *args, **kwargs):
        start = time.perf_counter()
        out = write_beton(records, path, *args, **kwargs)
        writes.append({"beton": Path(path).name, "images": len(records), "seconds": time.perf_counter() - start,
                       "workers": kwargs.get("num_workers")})
        return out

    prepare.write_beton = timed_write
    d = data_config(Path(a["tree"]), Path(a["betons"]), a["res"], a["batch_size"], a["jit"])
    base = rss_mib()

    def log(msg):
        print(f"  rank {rank}: {msg}", flush=True)

    dist.barrier()
    start = time.perf_counter()
    with ListingCounter(Path(a["tree"])) as listings, WorkersMemory() as workers:
        files = prepare.prepare_data(d, is_writer=rank == 0, broadcast=broadcast, log=log, progress=False,
                                     say_waiting=log)
    seconds = time.perf_counter() - start
    dist.barrier()
    out = {"rank": rank, "seconds": seconds, "tree_listings": listings.count, "writes": writes,
           "peak_rss_mib": peak_rss_mib(), "rss_after_import_mib": base,
           "workers_peak_private_mib": workers.peak_mib, "workers_seen": workers.most, **rss_kinds(),
           "train": str(files.train), "val": str(files.val), "num_train": files.num_train, "num_val": files.num_val,
           "classes": files.num_classes}
    dist.destroy_process_group()
    return out


def phase_load(a: dict) -> dict:
    import torch

    from trainer.data.loaders import TrainLoader
    d = data_config(Path(a["tree"]), Path(a["betons"]), a["res"], a["batch_size"], a["jit"])
    base = rss_mib()
    start = time.perf_counter()
    # As StageContext.train_loader builds it (one process: the per-process batch is the whole batch).
    loader = TrainLoader(Path(a["train"]), res=d.res, batch_size=d.batch_size, num_workers=d.num_workers, seed=0,
                         device=torch.device("cpu"), rank=0, world_size=1, min_crop_scale=d.min_crop_scale,
                         augment=d.augment, crop_ratio=d.val_crop_ratio, channels_last=False, jit=d.jit)
    build = time.perf_counter() - start
    runs = []
    for epoch in range(a["repeats"]):
        it = loader.epoch(epoch)
        t0 = t1 = None
        for i, (x, _, _) in enumerate(it):
            if i == 0 and tuple(x.shape) != (d.batch_size, 3, d.res, d.res):
                raise RuntimeError(f"batch of shape {tuple(x.shape)}")
            if i + 1 == a["warmup"]:
                t0 = time.perf_counter()
            if i + 1 == a["warmup"] + a["batches"]:
                t1 = time.perf_counter()
                break
        it.close()
        it.join(timeout=60)
        if t1 is None:
            raise RuntimeError(f"an epoch has fewer than --warmup + --batches = {a['warmup'] + a['batches']} batches")
        runs.append(a["batches"] * d.batch_size / (t1 - t0))
    return {"build_seconds": build, "images_per_second": statistics.median(runs), "runs": runs,
            "batches_per_epoch": len(loader), "workers": d.num_workers, "peak_rss_mib": peak_rss_mib(),
            "rss_after_import_mib": base, **rss_kinds()}


PHASES = {"scan": phase_scan, "prepare": phase_prepare, "load": phase_load}


def child_main(phase: str, args_json: str, out: str) -> None:
    """Run one phase in this (fresh) process and write its result to `out`."""
    from trainer.data import ffcv_import  # noqa: F401  (FFCV imported as the trainer imports it)
    result = PHASES[phase](json.loads(args_json))
    Path(out).write_text(json.dumps(result))


def run_phases(phase: str, argsets: list[dict], scratch: Path) -> list[dict]:
    """`phase` in one fresh process per argument set, all at once (a job's processes); their results."""
    procs, outs = [], []
    for i, a in enumerate(argsets):
        out = scratch / f"{phase}-{i}.json"
        out.unlink(missing_ok=True)
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", phase, json.dumps(a), str(out)],
                                      cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        outs.append(out)
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"error: the {phase} phase failed (exit codes {codes}); its output is above")
    return [json.loads(o.read_text()) for o in outs]


def median_round(rounds: list[dict]) -> dict:
    """The prepare rounds as one: every number the median over the rounds (lists of numbers element by
    element), the rounds themselves under "rounds"."""
    def med(values):
        first = values[0]
        if all(v == first for v in values) or not isinstance(first, (int, float, dict, list)):
            return first  # the same in every round (counts, paths), or not a number
        if isinstance(first, dict):
            return {k: med([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [med([v[i] for v in values]) for i in range(len(first))] if len({len(v) for v in values}) == 1 \
                else first
        return statistics.median(values)
    merged = {k: med([r[k] for r in rounds]) for k in rounds[0]}  # a new dict: it holds `rounds` below
    merged["beton_bytes_per_image"] = merged["beton_bytes"] / merged["images_written"]
    merged["rounds"] = rounds
    return merged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- one size, all phases


def measure_size(n: int, args, cores: int) -> dict:
    from benchmarks.common import load_average
    tree_root = Path(args.root).expanduser().resolve() / f"n{n}"
    tree, betons = tree_root / "train", tree_root / "betons"
    print(f"\n== N = {n}: {tree}", flush=True)
    t = time.perf_counter()
    generated = generate_tree(tree_root, n, args.classes, args.pool, args.seed, cores)
    print(f"tree ready ({generated['written']} files, generated in {generated['seconds']:.0f} s; "
          f"this call {time.perf_counter() - t:.0f} s)", flush=True)
    common = {"tree": str(tree), "betons": str(betons), "res": args.res, "batch_size": args.batch_size,
              "jit": args.jit}
    result = {"n": n, "generated": generated, "load_average_start": load_average()}

    scans = [run_phases("scan", [common], tree_root)[0] for _ in range(args.scan_repeats)]
    result["scan"] = {"seconds": statistics.median(s["seconds"] for s in scans),
                      "seconds_runs": [s["seconds"] for s in scans],
                      "peak_rss_mib": statistics.median(s["peak_rss_mib"] for s in scans),
                      "rss_after_import_mib": statistics.median(s["rss_after_import_mib"] for s in scans),
                      "listings": scans[0]["listings"], "images": scans[0]["images"]}
    runs = ", ".join(f"{s:.2f}" for s in result["scan"]["seconds_runs"])
    print(f"scan: {result['scan']['seconds']:.2f} s (runs {runs})", flush=True)

    rounds = []
    for _ in range(args.write_repeats):
        shutil.rmtree(betons, ignore_errors=True)  # so that prepare_data writes
        port = free_port()
        ranks = run_phases("prepare", [{**common, "rank": r, "world": 2, "port": port} for r in range(2)], tree_root)
        writer = ranks[0]
        written = sum(w["images"] for w in writer["writes"])
        seconds = sum(w["seconds"] for w in writer["writes"])
        rounds.append({"ranks": ranks, "images_written": written, "write_seconds": seconds,
                       "write_images_per_second": written / seconds,
                       "beton_bytes": sum(Path(writer[k]).stat().st_size for k in ("train", "val")),
                       "tree_listings_per_rank": [r["tree_listings"] for r in ranks]})
        print(f"prepare: wrote {written} images in {seconds:.1f} s ({written / seconds:.0f} img/s), betons "
              f"{rounds[-1]['beton_bytes'] / 2**30:.2f} GiB; tree listings per rank "
              f"{rounds[-1]['tree_listings_per_rank']}", flush=True)
    result["prepare"] = median_round(rounds)

    loads = run_phases("load", [{**common, "train": writer["train"], "warmup": args.warmup, "batches": args.batches,
                                 "repeats": args.repeats}], tree_root)[0]
    result["load"] = loads
    print(f"load: {loads['images_per_second']:.0f} img/s (runs {', '.join(f'{r:.0f}' for r in loads['runs'])}), "
          f"built in {loads['build_seconds']:.2f} s", flush=True)
    result["load_average_end"] = load_average()
    if args.remove_trees:
        shutil.rmtree(tree_root)
        print(f"removed {tree_root}", flush=True)
    return result


# --------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    head = (f"{'N':>9} {'scan s':>7} {'scan MiB':>9} {'write img/s':>12} {'write s':>8} {'beton GiB':>10} "
            f"{'B/img':>6} {'rank0 MiB':>10} {'workers MiB':>11} {'rank1 MiB':>10} {'listings r0/r1':>15} "
            f"{'load img/s':>11} {'build s':>8} {'load MiB':>9} {'anon/file':>11}")
    rows = [head]
    for r in results:
        s, p, ld = r["scan"], r["prepare"], r["load"]
        w, o = p["ranks"]
        rows.append(f"{r['n']:>9} {s['seconds']:>7.2f} {s['peak_rss_mib']:>9.0f} {p['write_images_per_second']:>12.0f} "
                    f"{p['write_seconds']:>8.1f} {p['beton_bytes'] / 2**30:>10.2f} {p['beton_bytes_per_image']:>6.0f} "
                    f"{w['peak_rss_mib']:>10.0f} {w['workers_peak_private_mib']:>11.0f} {o['peak_rss_mib']:>10.0f} "
                    f"{'/'.join(map(str, p['tree_listings_per_rank'])):>15} {ld['images_per_second']:>11.0f} "
                    f"{ld['build_seconds']:>8.2f} {ld['peak_rss_mib']:>9.0f} "
                    f"{ld['rss_anon_mib']:>5.0f}/{ld['rss_file_mib']:<5.0f}")
    return "\n".join(rows)


FIGURES = {  # name -> how to read it from a result, and whether it is a rate (constant = linear time)
    "scan seconds": lambda r: r["scan"]["seconds"],
    "scan peak RSS above import (MiB)": lambda r: r["scan"]["peak_rss_mib"] - r["scan"]["rss_after_import_mib"],
    "write seconds": lambda r: r["prepare"]["write_seconds"],
    "write images/s": lambda r: r["prepare"]["write_images_per_second"],
    "beton bytes": lambda r: r["prepare"]["beton_bytes"],
    "rank 0 peak RSS above import (MiB)": lambda r: r["prepare"]["ranks"][0]["peak_rss_mib"]
    - r["prepare"]["ranks"][0]["rss_after_import_mib"],
    "writer workers' private memory, peak sum (MiB)": lambda r: r["prepare"]["ranks"][0]["workers_peak_private_mib"],
    "rank 1 peak RSS above import (MiB)": lambda r: r["prepare"]["ranks"][1]["peak_rss_mib"]
    - r["prepare"]["ranks"][1]["rss_after_import_mib"],
    "loader build seconds": lambda r: r["load"]["build_seconds"],
    "loader images/s": lambda r: r["load"]["images_per_second"],
    "loader peak RSS above import (MiB)": lambda r: r["load"]["peak_rss_mib"] - r["load"]["rss_after_import_mib"],
    "loader anonymous RSS at the end (MiB)": lambda r: r["load"]["rss_anon_mib"],
    "loader file-backed RSS at the end (MiB)": lambda r: r["load"]["rss_file_mib"],
}


def growth(results: list[dict]) -> dict:
    """Each figure at the largest N over the smallest, next to the ratio of the N's."""
    if len(results) < 2:
        return {}
    small, large = results[0], results[-1]
    out = {"n_ratio": large["n"] / small["n"]}
    for name, get in FIGURES.items():
        a, b = get(small), get(large)
        out[name] = {"small": a, "large": b, "ratio": b / a if a else None}
    return out


def main() -> None:
    from benchmarks.common import argument_parser, machine_info, parse_args, write_report
    parser = argument_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_280_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--root", default="~/.cache/vp-prune/data-scale",
                        help="where the trees (about 4 KB per file on disk) and their betons are written")
    parser.add_argument("--pool", type=int, default=4096, help="distinct images the files are copies of")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-repeats", type=int, default=3)
    parser.add_argument("--write-repeats", type=int, default=3, help="prepare (write) rounds per N")
    parser.add_argument("--no-jit", dest="jit", action="store_false", help="FFCV uncompiled (data.jit=false)")
    parser.add_argument("--remove-trees", action="store_true", help="delete each tree after its measurements")
    args = parse_args(parser, "data_scale")
    cores = len(os.sched_getaffinity(0))
    report = {"benchmark": "data_scale", "machine": machine_info(cores=cores), "settings": vars(args), "results": []}
    for n in args.sizes:
        report["results"].append(measure_size(n, args, cores))
        report["growth"] = growth(report["results"])
        write_report(args.out, report)  # after every size: a long run keeps what it measured
    print()
    print(table(report["results"]))
    for name, g in report.get("growth", {}).items():
        if name != "n_ratio":
            print(f"{name:>40}: x{g['ratio']:.2f} for x{report['growth']['n_ratio']:.1f} images")
    write_report(args.out, report)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        main()
