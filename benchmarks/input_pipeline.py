"""Training input pipeline throughput on this machine's CPUs: ours against two peers on the same files.

    python benchmarks/input_pipeline.py                      # 1,200 ImageNet-like JPEGs, batch 128, 224 px
    python benchmarks/input_pipeline.py --folder DIR         # DIR/train/<class>/*.jpg instead
    python benchmarks/input_pipeline.py --tfds DIR           # also a prepared TFDS dataset (its version dir)
    python benchmarks/input_pipeline.py --array_record DIR   # and the same images stored as ArrayRecord
    python benchmarks/input_pipeline.py --quick              # 1 repeat, fewer batches: proves it runs

Every measurement runs in its own process (one at a time, on the same cores), ``--repeats`` times in
round-robin order, and the table reports medians (min-max). Implementations, all yielding uint8
[B, 224, 224, 3] RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + horizontal flip batches on the host:

* ``ours-folder``: ``data.train_iterator`` on the folder (``data.name='folder'``);
* ``ours-tfds``: ``data.train_iterator`` on the same images as a prepared TFDS dataset with JPEG-encoded
  ``Image`` features in TFRecord shards, read from its directory without builder code and streamed as an
  ImageNet-size split;
* ``ours-arrayrecord``: the same, on the same images prepared as ArrayRecord shards
  (``tfds build --file_format=array_record``);
* ``ours-folder-bicubic-aa``: the folder path with an antialiased bicubic resize (the cost of antialiasing);
* ``tfdata``: a plain fused tf.data reference (``extract_jpeg_shape`` -> sampled box ->
  ``decode_and_crop_jpeg`` -> bilinear resize -> uint8);
* ``tfdata-nested-guard``: the reference with a per-element nested ``tf.data.Dataset`` corrupt-file guard
  (``interleave`` of ``range(4).map(decode).ignore_errors().take(1)``), the guard ours no longer uses;
* ``torch``: a ``torch.utils.data.DataLoader`` with ``--workers`` workers over ImageFolder-style loading,
  torchvision's RandomResizedCrop (bicubic) and flip on PIL images.

Prints one JSON line per measurement, the load average (``os.getloadavg``) around the runs, and a table of
img/s, img/s per core and CPU time per image (the measured process's, all threads; not for torch, whose
workers are other processes) with the ratios to the tf.data reference and to the torch DataLoader, and the
ArrayRecord path's ratios to the TFRecord path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IMPLS = (
    "ours-folder",
    "ours-tfds",
    "ours-arrayrecord",
    "ours-folder-bicubic-aa",
    "tfdata",
    "tfdata-nested-guard",
    "torch",
)
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


# ---- data --------------------------------------------------------------------------------------------
def make_jpegs(root: str, count: int, classes: int = 10, seed: int = 0) -> str:
    """``count`` ImageNet-like JPEGs (300-500 px sides, ~70 KB) in ``root/train/<class>/`` (made once)."""
    import numpy as np
    from PIL import Image

    done = os.path.join(root, f".done-{count}")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        d = os.path.join(root, "train", f"class{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        base = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC
        )
        pixels = np.asarray(base).astype(np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90
        )
    open(done, "w").close()
    return root


def folder_files(root: str) -> tuple[list[str], list[int]]:
    split = os.path.join(root, "train")
    classes = sorted(os.listdir(split))
    paths, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(split, c))):
            if f.lower().endswith((".jpg", ".jpeg")):
                paths.append(os.path.join(split, c, f))
                labels.append(label)
    return paths, labels


def prepare_tfds(folder: str, out_dir: str, file_format: str = "tfrecord") -> str:
    """The folder's JPEGs as a prepared TFDS dataset (JPEG ``Image`` features, bytes stored as they are)
    in ``file_format`` shards ('tfrecord' or 'array_record', as ``tfds build --file_format`` writes).

    The builder class exists only in this process: the measured process reads the dataset from its
    directory (``tfds.builder_from_directory``), as it would a dataset whose code it cannot import.
    """
    import tensorflow_datasets as tfds

    paths, labels = folder_files(folder)

    class BenchJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # made once per format
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=max(labels) + 1),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
                yield i, {"image": path, "label": label}

    builder = BenchJpegs(data_dir=out_dir, file_format=file_format)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return str(builder.data_dir)


# ---- the measured processes --------------------------------------------------------------------------
def _time_batches(batches, batch: int, warmup: int, timed: int) -> dict:
    """img/s over ``timed`` batches, and this process's CPU time per image (all its threads), which other
    jobs on a shared machine disturb less than the rate."""
    for _ in range(warmup):
        next(batches)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(timed):
        b = next(batches)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    image = b["image"] if isinstance(b, dict) else b[0]
    return {
        "img_s": round(timed * batch / dt, 1),
        "cpu_us_img": round(cpu / (timed * batch) * 1e6),
        "seconds": round(dt, 2),
        "dtype": str(image.dtype),
    }


def child_ours(args) -> dict:
    sys.path.insert(0, REPO)
    from hybrid_distill_jax.data import train_iterator, validate_data_config
    from hybrid_distill_jax.data.formats import tfds as tfds_format

    cfg = dict(name="folder", data_dir=args.folder, train_split="train", eval_split="train", prefetch=2)
    if args.impl in ("ours-tfds", "ours-arrayrecord"):
        tfds_format.IN_MEMORY_MAX_BYTES = 0  # stream it, as an ImageNet-size split is
        cfg.update(name=args.tfds if args.impl == "ours-tfds" else args.array_record, data_dir=None)
    if args.impl == "ours-folder-bicubic-aa":
        cfg.update(resize_method="bicubic", antialias=True)
    validate_data_config(cfg)
    it = train_iterator(
        cfg, image_size=args.size, global_batch=args.batch, seed=0, process_index=0, process_count=1
    )
    return _time_batches(it, args.batch, args.warmup, args.batches)


def _nested_guard(decode, path):
    """The per-element corrupt-file guard ours used to have: a small dataset built for every element."""
    import tensorflow as tf

    attempts = tf.data.Dataset.range(4).map(lambda k: decode(path)).ignore_errors().take(1)
    none = tf.data.Dataset.from_tensors(tf.zeros([1, 1, 3], tf.uint8))
    return attempts.concatenate(none).take(1)


def child_tfdata(args) -> dict:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    paths, labels = folder_files(args.folder)
    size = args.size

    def crop(path):
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        begin, box, _ = tf.image.sample_distorted_bounding_box(
            shape,
            tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            min_object_covered=0.0,
            aspect_ratio_range=RATIO,
            area_range=SCALE,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], box[0], box[1]]), channels=3)

    def finish(image):
        image = tf.cast(tf.image.resize(image, [size, size], method="bilinear"), tf.uint8)
        return tf.image.random_flip_left_right(image)

    ds = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths)).repeat()
    if args.impl == "tfdata-nested-guard":
        ds = ds.interleave(
            lambda p: _nested_guard(crop, p),
            cycle_length=8,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda p: finish(crop(p)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _time_batches(iter(ds.as_numpy_iterator()), args.batch, args.warmup, args.batches)


def child_torch(args) -> dict:
    import torch
    from PIL import Image

    from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops

    declare_torchvision_ops()  # PyPI's CUDA torchvision beside a CPU torch: its Python transforms still work
    from torchvision import transforms

    paths, labels = folder_files(args.folder)
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.size, scale=SCALE, ratio=RATIO, interpolation=3),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    kind = "torchvision"

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                img = Image.open(f).convert("RGB")
            return transform(img), labels[i]

    loader = torch.utils.data.DataLoader(
        Files(),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
    )

    def forever():
        while True:
            yield from loader

    out = _time_batches(forever(), args.batch, args.warmup, args.batches)
    return dict(out, transforms=kind, cpu_us_img=None)  # the decoding runs in the worker processes


# ---- the driver --------------------------------------------------------------------------------------
def run_child(args, impl: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--folder", args.folder]
    cmd += ["--batch", str(args.batch), "--size", str(args.size), "--workers", str(args.workers)]
    cmd += ["--warmup", str(args.warmup), "--batches", str(args.batches)]
    for flag in ("tfds", "array_record"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "error": err, "load1": load}
    return dict(json.loads(lines[-1]), impl=impl, load1=round(load, 2))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="", help="root with train/<class>/*.jpg (default: make JPEGs)")
    ap.add_argument(
        "--tfds", default="", help="a prepared TFDS dataset's version directory (default: make one)"
    )
    ap.add_argument(
        "--array_record", default="", help="the same dataset prepared as ArrayRecord (default: make one)"
    )
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hdj_input_bench"))
    ap.add_argument("--images", type=int, default=1200, help="JPEGs to make when no --folder is given")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="torch DataLoader workers")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches")
    ap.add_argument("--batches", type=int, default=60, help="timed batches")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per implementation (medians)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--quick", action="store_true", help="1 repeat, 1 warm-up and 4 timed batches")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup, a.batches = 1, 1, 4
    a.impl_list = [i for i in a.impls.split(",") if i]
    unknown = set(a.impl_list) - set(IMPLS)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}: expected some of {list(IMPLS)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.impl = args.child
        run = child_torch if args.child == "torch" else child_tfdata if "tfdata" in args.child else child_ours
        print(json.dumps(run(args)), flush=True)
        return 0
    if not args.folder:
        args.folder = make_jpegs(os.path.join(args.workdir, "jpegs"), args.images)
    if not args.tfds and "ours-tfds" in args.impl_list:
        args.tfds = prepare_tfds(args.folder, os.path.join(args.workdir, "tfds"))
    if not args.array_record and "ours-arrayrecord" in args.impl_list:
        args.array_record = prepare_tfds(
            args.folder, os.path.join(args.workdir, "tfds-array_record"), "array_record"
        )
    paths, _ = folder_files(args.folder)
    size_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"# {len(paths)} JPEGs in {args.folder} (mean {size_kb:.0f} KB); batch {args.batch}, {args.size} px"
    )
    print(f"# {cores} cores; {args.repeats} round(s) of {len(args.impl_list)} processes, one at a time")
    print(f"# load average before: {os.getloadavg()}", flush=True)
    results: dict[str, list[dict]] = {impl: [] for impl in args.impl_list}
    for _ in range(args.repeats):
        for impl in args.impl_list:
            r = run_child(args, impl)
            results[impl].append(r)
            print(json.dumps(r), flush=True)
    print(f"# load average after: {os.getloadavg()}")

    def median(impl, key="img_s"):
        values = [r[key] for r in results.get(impl, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    ref, torch_rate = median("tfdata"), median("torch")
    print(
        f"\n| pipeline | img/s median (min-max) of {args.repeats} | img/s per core | CPU µs/img | vs tf.data "
        "| vs torch |"
    )
    print("|---|---|---|---|---|---|")
    summary = {}
    for impl in args.impl_list:
        rates = [r["img_s"] for r in results[impl] if "img_s" in r]
        if not rates:
            print(f"| {impl} | error: {results[impl][-1].get('error')} | | | | |")
            continue
        m, cpu = statistics.median(rates), median(impl, "cpu_us_img")
        vs_ref = f"{m / ref:.2f}x" if ref else "-"
        vs_torch = f"{m / torch_rate:.2f}x" if torch_rate else "-"
        note = f" ({results[impl][-1]['transforms']})" if "transforms" in results[impl][-1] else ""
        spread = f"{m:.0f} ({min(rates):.0f}-{max(rates):.0f})"
        print(f"| {impl}{note} | {spread} | {m / cores:.0f} | {cpu or '-'} | {vs_ref} | {vs_torch} |")
        summary[impl] = dict(median_img_s=m, rates=rates, per_core=m / cores, median_cpu_us_img=cpu)
    if summary.get("ours-arrayrecord") and summary.get("ours-tfds"):
        ar, tfr = summary["ours-arrayrecord"], summary["ours-tfds"]
        print(
            f"\nours-arrayrecord / ours-tfds (ArrayRecord / TFRecord shards, same images): "
            f"{ar['median_img_s'] / tfr['median_img_s']:.2f}x the img/s, "
            f"{ar['median_cpu_us_img'] / tfr['median_cpu_us_img']:.2f}x the CPU time per image"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, runs=results, cores=cores, folder=args.folder), f, indent=2)
    return 0 if all(summary.get(i) for i in args.impl_list) else 1


if __name__ == "__main__":
    sys.exit(main())
