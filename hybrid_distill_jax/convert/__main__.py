"""CLI: ``python -m hybrid_distill_jax.convert {import,export} ...`` (see docs/CONVERT.md).

  import --family {timm,deit,mae,clip,open_clip,dino} --input FILE --output DIR
         [--image-size N] [--heads N] [--act gelu|gelu_tanh|quick_gelu] [--norm-eps E]
         [--mean R G B] [--std R G B]
  export --input DIR --output FILE.{safetensors,pth} [--timm-name vit_base_patch16_224]

Errors (a missing file, a URL, a checkpoint that does not fit the family) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_distill_jax.errors import CheckpointError, ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    from hybrid_distill_jax.convert.families import FAMILIES

    parser = argparse.ArgumentParser(
        prog="python -m hybrid_distill_jax.convert",
        description="Convert PyTorch ViT checkpoints (local files only) to and from our exported models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import",
        help="a PyTorch checkpoint file -> an exported-model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="families:\n" + "\n".join(f"  {k:10s} {f.help}" for k, f in FAMILIES.items()),
    )
    imp.add_argument("--family", required=True, choices=sorted(FAMILIES))
    imp.add_argument(
        "--input", required=True, help="local .pth/.pt/.bin/.safetensors file (never downloaded)"
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
        choices=("gelu", "gelu_tanh", "quick_gelu"),
        default=None,
        help="MLP activation (default: quick_gelu for clip, gelu otherwise; open_clip "
        "'-quickgelu' models and OpenAI weights loaded through open_clip need quick_gelu)",
    )
    imp.add_argument(
        "--norm-eps",
        type=float,
        default=None,
        help="LayerNorm epsilon (default: 1e-5 for clip/open_clip, 1e-6 otherwise; timm's "
        "*_clip_* ViTs need 1e-5)",
    )
    imp.add_argument("--mean", type=float, nargs=3, default=None, help="input mean (default: the family's)")
    imp.add_argument("--std", type=float, nargs=3, default=None, help="input std (default: the family's)")
    exp = sub.add_parser("export", help="an exported-model directory -> a timm VisionTransformer state dict")
    exp.add_argument("--input", required=True, help="directory with model.json + params.msgpack")
    exp.add_argument("--output", required=True, help="FILE.safetensors (no torch needed) or FILE.pth")
    exp.add_argument(
        "--timm-name",
        default=None,
        help="timm model name to print in the load command (default vit_base_patch16_224)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from hybrid_distill_jax import convert

    try:
        if args.command == "import":
            convert.import_checkpoint(
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
        else:
            convert.export_timm(args.input, args.output, timm_name=args.timm_name)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
