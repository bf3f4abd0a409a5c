"""Attention diagnostics of exported models, and the ``evaluate`` mode.

CLI (any exported or converted model directory; plots + JSON)::

    python -m hybrid_distill_jax.experiments.analyze --model runs/demo/teacher_mae/export \\
        --model hybrid=runs/demo/hybrid_student/export --data embedded_fashion_mnist --out runs/analysis

writes ``OUT/diagnostics.json`` ({name: per-layer, per-head distance and NMI}), ``OUT/attention_distance.png``
and ``OUT/nmi.png``. A model is ``DIR`` (named after its directory) or ``NAME=DIR``.

``mode='evaluate'`` (``configs/eval.py``): k-NN and linear probe on frozen features of
``config.model_dir`` (+ diagnostics), written to ``WORKDIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hybrid_distill_jax import config_lib, errors, hardware, teachers, workdir_lock
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments import plots


def _name_of(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, directory = spec.split("=", 1)
        return name, directory
    path = os.path.normpath(spec)
    base = os.path.basename(path)
    if base == "export":  # WORKDIR/<stage>/export -> <stage>
        base = os.path.basename(os.path.dirname(path)) or base
    return base, spec


def analyze_models(
    models: dict[str, str],
    data_cfg,
    out_dir: str,
    *,
    num_images: int = 512,
    batch_size: int = 128,
    image_size: int = 0,
    split: str | None = None,
) -> dict:
    """Diagnostics of every {name: model dir}; writes diagnostics.json and the plots into ``out_dir``."""
    results = {}
    for name, directory in models.items():
        start = time.perf_counter()
        results[name] = diagnostics.diagnose_model_dir(
            directory,
            data_cfg,
            num_images=num_images,
            batch_size=batch_size,
            image_size=image_size,
            split=split,
        )
        print(
            f"[analyze] {name}: {results[name]['num_images']} images in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    os.makedirs(out_dir, exist_ok=True)
    diagnostics.save(results, os.path.join(out_dir, "diagnostics.json"))
    paths = plots.plot_diagnostics(results, out_dir)
    return {"results": results, "plots": paths}


def _data_cfg(name: str, data_dir: str | None, split: str):
    import ml_collections

    base = config_lib.base_config("evaluate").data
    base.name = name
    base.data_dir = data_dir
    if name == "embedded_fashion_mnist":
        base.train_split, base.eval_split = "train", "test"
    base.eval_split = split or base.eval_split
    return ml_collections.ConfigDict(base.to_dict())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hybrid_distill_jax.experiments.analyze", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", action="append", required=True, help="DIR or NAME=DIR (repeatable)")
    p.add_argument("--data", default="embedded_fashion_mnist", help="TFDS name (or 'folder')")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir / folder root")
    p.add_argument("--split", default="", help="split to run on (default: the dataset's eval split)")
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=0, help="0 = each model's own input resolution")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)

    def run():
        models = dict(_name_of(m) for m in args.model)
        if len(models) != len(args.model):
            raise ConfigError("--model: two models share a name; use NAME=DIR")
        if args.num_images <= 0 or args.batch_size <= 0 or args.image_size < 0:
            raise ConfigError("--num_images and --batch_size must be positive, --image_size >= 0")
        hardware.platform()  # a JAX_PLATFORMS this host cannot start: one line
        out = analyze_models(
            models,
            _data_cfg(args.data, args.data_dir, args.split),
            args.out,
            num_images=args.num_images,
            batch_size=args.batch_size,
            image_size=args.image_size,
        )
        for name, r in out["results"].items():
            s = diagnostics.summary_scalars(r)
            print(f"{name}: mean distance {s['distance/mean']:.2f} px, mean NMI {s['nmi/mean']:.3f}")
        print(f"wrote {os.path.join(args.out, 'diagnostics.json')}, {', '.join(out['plots'].values())}")

    return errors.exit_status_of(run)


# ------------------------------------------------------------------------------------- evaluate mode


def evaluate_model_dir(config, workdir: str) -> dict:
    """``mode='evaluate'``: k-NN + linear probe (and diagnostics) of ``config.model_dir`` -> eval.json."""
    import jax

    from hybrid_distill_jax.data import dataset_info
    from hybrid_distill_jax.eval.features import probe_frozen_features
    from hybrid_distill_jax.models import io as model_io
    from hybrid_distill_jax.models.build import normalize, pooled_features

    config_lib.validate(config)
    workdir = workdir_lock.check_workdir(workdir)
    model_dir = teachers.resolve(config.model_dir, "model_dir")
    model, params, meta = model_io.load_model(model_dir, field="model_dir")
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.image_size = int(config.image_size or meta["input"]["image_size"])
    size, pool = cfg.image_size, cfg.eval.pool
    mean, std = tuple(meta["input"]["mean"]), tuple(meta["input"]["std"])

    def feature_fn(p, images):
        out = model.apply({"params": p}, normalize(images, mean, std, size))
        return pooled_features(out, pool, model.num_prefix)

    info = dataset_info(cfg.data)
    start = time.perf_counter()
    summary = probe_frozen_features(cfg, feature_fn, jax.device_put(params), info.num_classes)
    if cfg.eval.get("diagnostics", False):
        diag = diagnostics.AttentionDiagnostics(model, mean, std, size)(
            params,
            diagnostics.fixed_eval_batches(
                cfg.data, size, cfg.eval.diagnostics_examples, cfg.eval.batch_size
            ),
        )
        diag["model_dir"] = os.path.abspath(model_dir)
        name = _name_of(config.model_dir)[0]
        diagnostics.save({name: diag}, os.path.join(workdir, "diagnostics.json"))
        plots.plot_diagnostics({name: diag}, workdir)
        summary.update({f"diag/{k}": v for k, v in diagnostics.summary_scalars(diag).items()})
    summary["eval_seconds"] = time.perf_counter() - start
    errors.write_atomically(os.path.join(workdir, "eval.json"), json.dumps(summary, indent=2).encode())
    print(json.dumps({k: round(v, 3) for k, v in summary.items() if not k.startswith("diag/")}))
    print(f"wrote {os.path.join(workdir, 'eval.json')}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
