"""CLI: ``python -m hybrid_distill_jax.teachers {import,export,list} ...`` (see docs/CONVERT.md).

  import --family {clip,deit,dino,mae,open_clip,timm} --input FILE --output DIR
         [--image-size N] [--heads N] [--act gelu|gelu_tanh|quick_gelu] [--norm-eps E]
         [--mean R G B] [--std R G B]
  import --input hf-hub:ORG/NAME[@REVISION] --output DIR      (a timm safetensors repo, teachers.hub)
  export --input DIR --output FILE.{safetensors,pth} [--timm-name vit_base_patch16_224]
  list                                                         (the known teachers by short name)

Errors (a missing file, a URL, an unreachable hub, a checkpoint that does not fit the family) print
one message and exit 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from hybrid_distill_jax import errors, hardware
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.vit import ACTIVATIONS
from hybrid_distill_jax.teachers import hub, importer
from hybrid_distill_jax.teachers.families import FAMILIES
from hybrid_distill_jax.teachers.known import KNOWN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_distill_jax.teachers",
        description="Convert PyTorch ViT checkpoints (local files or hf-hub: names) to and from our "
        "exported models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import",
        help="a PyTorch checkpoint file -> an exported-model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="families:\n" + "\n".join(f"  {k:10s} {f.help}" for k, f in FAMILIES.items()),
    )
    imp.add_argument(
        "--family", choices=sorted(FAMILIES), help="required for a local file (hf-hub: names are timm)"
    )
    imp.add_argument(
        "--input",
        required=True,
        help="local .pth/.pt/.bin/.safetensors file, or hf-hub:ORG/NAME[@REVISION] (a timm repo with "
        "model.safetensors + config.json, fetched with huggingface_hub and converted once into a cache)",
    )
    imp.add_argument("--output", required=True, help="directory to write model.json + params.msgpack to")
    imp.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resample the position embedding to this input size (e.g. 196 for CLIP-L/14 "
        "beside a /16 student at 224)",
    )
    imp.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads (not stored in checkpoints; default by width: 192->3, 384->6, "
        "768->12, 1024->16, 1280->16)",
    )
    imp.add_argument(
        "--act",
        choices=tuple(ACTIVATIONS),
        default=None,
        help="MLP activation (default: quick_gelu for clip, gelu for the others; --family timm reads it "
        "from a timm config.json beside the file, and without one needs it for pre-norm towers; open_clip "
        "'-quickgelu' models and OpenAI weights loaded through open_clip need quick_gelu)",
    )
    imp.add_argument(
        "--norm-eps",
        type=float,
        default=None,
        help="LayerNorm epsilon (default: 1e-5 for clip/open_clip, 1e-6 for deit/mae/dino; --family timm "
        "reads it from a timm config.json beside the file, and without one needs it for pre-norm towers)",
    )
    norm_help = (
        "(default: the family's; --family timm: from a timm config.json beside the file, else required)"
    )
    imp.add_argument("--mean", type=float, nargs=3, default=None, help=f"input mean {norm_help}")
    imp.add_argument("--std", type=float, nargs=3, default=None, help=f"input std {norm_help}")
    exp = sub.add_parser("export", help="an exported-model directory -> a timm VisionTransformer state dict")
    exp.add_argument("--input", required=True, help="directory with model.json + params.msgpack")
    exp.add_argument("--output", required=True, help="FILE.safetensors (no torch needed) or FILE.pth")
    exp.add_argument(
        "--timm-name",
        default=None,
        help="timm model name to print in the load command (default: vit_base_patch16_224, a DeiT "
        "distilled name for a distillation token, vit_*_patch16_dinov3[_qkvb] for rotary embeddings)",
    )
    sub.add_parser(
        "list", help="the known teachers: short name, hf-hub: name, input resolution, licence, what each is"
    )
    return parser


_HUB_FLAGS = ("image_size", "heads", "act", "norm_eps", "mean", "std")


def _import(args) -> None:
    if hub.is_hub_name(args.input):
        given = [f"--{k.replace('_', '-')}" for k in _HUB_FLAGS if getattr(args, k) is not None]
        if given or args.family not in (None, "timm"):
            raise ConfigError(
                f"--input={args.input}: {', '.join(given) or '--family ' + args.family} cannot be combined "
                "with a hub name (its config.json fixes the architecture and input; teachers.*.image_size "
                "resamples at run time)"
            )
        cached = hub.resolve(args.input, "--input", log=print)
        shutil.copytree(cached, args.output, dirs_exist_ok=True)
        print(f"copied {cached} -> {args.output}")
        return
    if args.family is None:
        raise ConfigError("--family is required for a local --input file")
    importer.import_checkpoint(
        args.family,
        args.input,
        args.output,
        image_size=args.image_size,
        heads=args.heads,
        act=args.act,
        norm_eps=args.norm_eps,
        mean=args.mean,
        std=args.std,
    )


def list_known(print_fn=print) -> None:
    """The known teachers (short name, hub name, input resolution, licence, what each is) and where their
    conversions are cached."""
    width = max(len("short name"), *(len(name) for name in KNOWN))
    hub_width = max(len(t.hub) for t in KNOWN.values())
    lic_width = max(len("licence"), *(len(t.licence) for t in KNOWN.values()))
    print_fn(f"{'short name':{width}}  {'hub name':{hub_width}}  {'px':>4}  {'licence':{lic_width}}  what")
    for name, t in KNOWN.items():
        print_fn(f"{name:{width}}  {t.hub:{hub_width}}  {t.image_size:>4}  {t.licence:{lic_width}}  {t.what}")
    print_fn(
        f"\nconverted once into {os.path.join(hub.cache_root(), 'teachers')} ({hub.CACHE_ENV} to move it); "
        "files come from huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE); a recipe names a known "
        "teacher with hybrid_distill_jax.teachers.hub_name('SHORT')"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        hardware.cpu_without_accelerators()
        if args.command == "import":
            _import(args)
        elif args.command == "list":
            list_known()
        else:
            importer.export_timm(args.input, args.output, timm_name=args.timm_name)

    return errors.exit_status_of(run)


if __name__ == "__main__":
    sys.exit(main())
