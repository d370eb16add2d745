"""Input pipeline throughput: keras-vit's tf.data pipelines beside torchvision's, in one run.

    python -m bench.data                     # 800 generated JPEGs (375x500, 4 classes) -> 224, batch 32
    python -m bench.data --rounds 3          # more rounds (keras-vit and torchvision interleaved)
    python -m bench.data --quick             # a smoke test: 64 images, 1 round, small listing tree

Each round runs every case in its own process, keras-vit and torchvision alternating, on the
same JPEG files and the same number of CPU cores: keras-vit as training uses it
(`keras_vit.data.load("folder:...")` + `pipeline(training=True, augment=..., cache=False)`),
torchvision as timm users run it (`ImageFolder` + `DataLoader(num_workers=cores)`, PIL decode).
A case times whole epochs after a first one (so that tracing and worker start-up are not counted)
and reports images/s (wall) and images per CPU-second (the process's threads and its DataLoader
workers: images/s per core, the figure that other processes' load disturbs least). Augmentations:

    none         resize to 224x224                   | Resize((224, 224))
    basic        + zero-pad 28, random crop, flip    | + RandomCrop(224, padding=28), RandomHorizontalFlip
    randaugment  basic + RandAugment(2 ops)          | basic + RandAugment(num_ops=2, magnitude=9)
    inception    random-resized crop + flip          | RandomResizedCrop(224) + RandomHorizontalFlip
    mix          basic + MixUp(0.8)/CutMix(1.0) per batch | basic + v2.RandomChoice([MixUp(0.8), CutMix(1.0)]) in collate

The listing case times `keras_vit.data.folders.list_images` and torchvision's
`ImageFolder.make_dataset` on a tree of empty files (files/s, page cache warm).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

AUGMENTS = ("none", "basic", "randaugment", "inception", "mix")
SIZE = 224
PAD = SIZE // 8


def make_images(root: str, n: int, classes: int = 4, shape=(375, 500)) -> str:
    """`n` photo-like JPEGs (smooth colour fields with texture and noise, quality 90), once."""
    import numpy as np
    from PIL import Image

    done = os.path.join(root, f".done-{n}")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        cls = f"class{i % classes}"
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        f = rng.uniform(0.005, 0.05, 3)
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([127 + 100 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(root, cls, f"{i:06d}.jpg"), quality=90)
    open(done, "w").close()
    return root


def make_tree(root: str, n: int, classes: int = 10) -> str:
    """`n` empty .jpg files in `classes` folders (the listing case), once."""
    done = os.path.join(root, f".done-{n}")
    if os.path.exists(done):
        return root
    for c in range(classes):
        d = os.path.join(root, f"c{c:03d}")
        os.makedirs(d, exist_ok=True)
        for j in range(n // classes):
            open(os.path.join(d, f"{j:07d}.jpg"), "wb").close()
    open(done, "w").close()
    return root


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(pids=()) -> float:
    """CPU seconds used by this process (all threads) and by the processes `pids`."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _time_epochs(make_iter, epochs: int, pids=lambda: ()) -> Dict[str, object]:
    """Run one untimed epoch, then `epochs` timed ones: images/s (wall) and images per CPU second
    (this process and its workers: a figure that other processes' load disturbs far less)."""
    n = sum(b for b in make_iter())
    rates, per_cpu = [], []
    for _ in range(epochs):
        c0, t0 = _cpu_seconds(pids()), time.perf_counter()
        count = sum(b for b in make_iter())
        rates.append(count / (time.perf_counter() - t0))
        per_cpu.append(count / max(_cpu_seconds(pids()) - c0, 1e-9))
    return {"images": n, "img_s_values": rates, "img_cpu_s_values": per_cpu}


def run_kerasvit(augment: str, args) -> Dict[str, object]:
    from keras_vit import data

    splits = data.load(f"folder:{args.images_dir}", val_fraction=0.01)
    mix = dict(mixup=0.8, cutmix=1.0) if augment == "mix" else {}
    ds = data.pipeline(splits.train, image_size=(SIZE, SIZE), batch_size=args.batch_size,
                       num_classes=splits.num_classes, training=True, cache=False,
                       augment="basic" if augment == "mix" else augment, **mix)

    def batches():
        for x, _ in ds:
            yield int(x.shape[0])

    return _time_epochs(batches, args.epochs)


def run_torchvision(augment: str, args) -> Dict[str, object]:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T
    from torchvision.transforms import v2

    to_tensor = [T.PILToTensor(), T.ConvertImageDtype(torch.float32)]
    basic = [T.Resize((SIZE, SIZE)), T.RandomCrop(SIZE, padding=PAD), T.RandomHorizontalFlip()]
    pipes = {"none": [T.Resize((SIZE, SIZE))], "basic": basic, "mix": basic,
             "randaugment": basic + [T.RandAugment(num_ops=2, magnitude=9)],
             "inception": [T.RandomResizedCrop(SIZE, antialias=True), T.RandomHorizontalFlip()]}
    ds = datasets.ImageFolder(args.images_dir, transform=T.Compose(pipes[augment] + to_tensor))
    collate = None
    if augment == "mix":
        mixer = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=len(ds.classes)),
                                 v2.CutMix(alpha=1.0, num_classes=len(ds.classes))])

        def collate(batch):
            return mixer(*torch.utils.data.default_collate(batch))

    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cores(), persistent_workers=True, collate_fn=collate)

    def batches():
        for x, _ in loader:
            yield int(x.shape[0])

    def pids():
        it = getattr(loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    return _time_epochs(batches, args.epochs, pids)


def run_listing(framework: str, args) -> Dict[str, object]:
    rates, per_cpu = [], []
    for _ in range(args.epochs + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        if framework == "keras-vit":
            from keras_vit.data.folders import list_images

            n = len(list_images(args.tree_dir)[0])
        else:
            from torchvision import datasets

            classes, idx = datasets.folder.find_classes(args.tree_dir)
            n = len(datasets.ImageFolder.make_dataset(args.tree_dir, idx, extensions=(".jpg", ".jpeg", ".png")))
        rates.append(n / (time.perf_counter() - t0))
        per_cpu.append(n / max(time.process_time() - c0, 1e-9))
    return {"images": n, "img_s_values": rates[1:], "img_cpu_s_values": per_cpu[1:]}


def worker(case: str, args) -> None:
    framework, what = case.split(":")
    if what == "list":
        res = run_listing(framework, args)
    else:
        res = (run_kerasvit if framework == "keras-vit" else run_torchvision)(what, args)
    common.emit(dict(res, case=case, cores=cores()))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=800, help="generated JPEGs")
    p.add_argument("--list-files", type=int, default=100_000, help="empty files in the listing tree")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per case (after one untimed)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all cases, frameworks interleaved")
    p.add_argument("--augment", nargs="*", default=list(AUGMENTS), choices=AUGMENTS)
    p.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "keras_vit_bench_data"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.list_files, args.rounds, args.epochs = 64, 2000, 1, 1
    common.check_args(args)
    args.images_dir = os.path.join(args.work_dir, f"jpegs-{args.images}")
    args.tree_dir = os.path.join(args.work_dir, f"tree-{args.list_files}")
    return args


def _forward(args) -> List[str]:
    return ["--images", str(args.images), "--list-files", str(args.list_files), "--batch-size",
            str(args.batch_size), "--epochs", str(args.epochs), "--work-dir", args.work_dir]


def main(argv=None) -> List[Dict[str, object]]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return []
    common.header("data", {"images": args.images, "batch_size": args.batch_size, "list_files": args.list_files})
    make_images(args.images_dir, args.images)
    make_tree(args.tree_dir, args.list_files)
    peers = common.have("torchvision")
    cases = [w for a in ["list"] + list(args.augment) for w in (f"keras-vit:{a}", f"torchvision:{a}")]
    merged: Dict[str, Dict[str, object]] = {}
    for rnd in range(args.rounds):
        order = cases if rnd % 2 == 0 else [c for pair in zip(cases[1::2], cases[0::2]) for c in pair]
        for case in order:
            if case.startswith("torchvision") and not peers:
                merged[case] = common.skipped(case, "torchvision not installed (bench/requirements.txt)")
                continue
            r = common.run_case("bench.data", case, _forward(args))
            print(f"  round {rnd + 1} {case}: " + (
                f"{sum(r['img_s_values']) / len(r['img_s_values']):.0f}/s, "
                f"{sum(r['img_cpu_s_values']) / len(r['img_cpu_s_values']):.0f} per CPU-s"
                if "img_s_values" in r else r.get("error", "")), flush=True)
            if "img_s_values" in r:
                prev = merged.get(case, {"img_s_values": [], "img_cpu_s_values": []})
                merged[case] = dict(r, img_s_values=prev["img_s_values"] + r["img_s_values"],
                                    img_cpu_s_values=prev["img_cpu_s_values"] + r["img_cpu_s_values"])
            else:
                merged.setdefault(case, r)
    results = list(merged.values())
    for r in results:
        if "img_s_values" in r:
            r["img_s"] = common.summary(r["img_s_values"])
            r["img_cpu_s"] = common.summary(r["img_cpu_s_values"])
    _report(results, args)
    print("load after:", common.machine()["load"])
    return results


def _report(results, args) -> None:
    by = {r["case"]: r for r in results}
    rows = []
    for what in ["list"] + list(args.augment):
        k, t = by.get(f"keras-vit:{what}", {}), by.get(f"torchvision:{what}", {})
        if "img_s" not in k:
            continue
        row = {"what": what, "k": k["img_s"], "t": t.get("img_s"), "kc": k["img_cpu_s"], "tc": t.get("img_cpu_s")}
        rows.append(row)

    def fmt(s):
        return "-" if not s else f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    def ratio(a, b):
        return f"{a['median'] / b['median']:.2f}x" if a and b else "-"

    common.print_table(
        f"input pipelines, {args.images} JPEGs 375x500 -> {SIZE}, batch {args.batch_size}; listing: "
        f"{args.list_files} files (img/s; files/s for list; median (min-max) over rounds x epochs)", rows, [
            ("pipeline", lambda r: r["what"]),
            ("keras-vit", lambda r: fmt(r["k"])),
            ("torchvision", lambda r: fmt(r["t"])),
            ("ratio", lambda r: ratio(r["k"], r["t"])),
            ("keras-vit per CPU-s", lambda r: fmt(r["kc"])),
            ("torchvision per CPU-s", lambda r: fmt(r["tc"])),
            ("ratio per CPU-s", lambda r: ratio(r["kc"], r["tc"])),
        ])
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"  {r['case']}: {r.get('error') or 'skipped: ' + r['skipped']}")


if __name__ == "__main__":
    sys.exit(common.failed(main()))  # 1 when a case failed: a caller reading the status sees it
