"""PyTorch <-> Flax conversion: every family against its real torch implementation (timm, open_clip).

Tiny random models (32x32 images, patch 8, width 64, depth 2, 4 heads) with every parameter perturbed
are saved in each supported format, converted, and compared on the same random images: the final
tokens (after the final norm) and every layer's attention probabilities, within 1e-4 in fp32. The
measured maxima are printed (``pytest -s``) and recorded in docs/CONVERT.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion tests need torch: bash scripts/install_torch_cpu.sh")

from hybrid_distill_jax.errors import CheckpointError, ConfigError  # noqa: E402
from hybrid_distill_jax.models import io as model_io  # noqa: E402
from hybrid_distill_jax.models.vit import resample_posemb, sincos_posemb_2d  # noqa: E402
from hybrid_distill_jax.teachers import (  # noqa: E402
    families,
    importer,  # noqa: E402
    torch_io,
)
from hybrid_distill_jax.teachers.__main__ import main as cli_main  # noqa: E402
from hybrid_distill_jax.teachers.families.base import CLIP_INPUT  # noqa: E402
from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops  # noqa: E402
from tests.torch_reference import ours as _ours  # noqa: E402
from tests.torch_reference import randomize as _randomize  # noqa: E402
from tests.torch_reference import timm_reference as _timm_reference  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-4
SIZE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 64, 2, 4
# a bare timm state dict does not record its input normalisation: the flags give it
IMNET = dict(mean=model_io.IMAGENET_MEAN, std=model_io.IMAGENET_STD)


declare_torchvision_ops()
timm = pytest.importorskip("timm", reason="conversion tests need timm: bash scripts/install_torch_cpu.sh")
open_clip = pytest.importorskip("open_clip", reason="needs open_clip_torch: scripts/install_torch_cpu.sh")
from open_clip.transformer import QuickGELU  # noqa: E402
from open_clip.transformer import VisionTransformer as ClipVisionTransformer  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

# ------------------------------------------------------------------------------------------------ helpers


def _images(seed=0, n=2, size=SIZE):
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _clip_reference(visual, x):
    """(all tokens after ln_post, {layer: probs} from nn.MultiheadAttention(need_weights=True), embedding)."""
    inputs, post = {}, {}
    hooks = [
        blk.attn.register_forward_pre_hook(
            lambda mod, args, kw, i=i: inputs.__setitem__(i, args[0]), with_kwargs=True
        )
        for i, blk in enumerate(visual.transformer.resblocks)
    ]
    hooks.append(visual.ln_post.register_forward_hook(lambda mod, args, out: post.__setitem__("x", out)))
    with torch.no_grad():
        embedding = visual(x)
        probs = {}
        for i, blk in enumerate(visual.transformer.resblocks):
            h = inputs[i]
            _, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
            probs[i + 1] = w.numpy()
    for hk in hooks:
        hk.remove()
    tokens = post["x"]
    if not getattr(visual.transformer, "batch_first", True):
        tokens = tokens.permute(1, 0, 2)
    if isinstance(embedding, tuple):
        embedding = embedding[0]
    return tokens.numpy(), probs, embedding.numpy()


def _compare(name, model, params, x, ref_tokens, ref_probs):
    out, probs = _ours(model, params, x)
    tok_err = float(np.abs(np.asarray(out["tokens"]) - ref_tokens).max())
    assert set(probs) == set(ref_probs) == set(range(1, model.depth + 1))
    attn_err = max(float(np.abs(probs[k] - ref_probs[k]).max()) for k in ref_probs)
    print(f"\n[parity] {name}: tokens max|err|={tok_err:.2e}, attention probs max|err|={attn_err:.2e}")
    assert tok_err < TOL and attn_err < TOL, (tok_err, attn_err)
    return out


def _timm_vit(seed=0, num_classes=10, **kw):
    kw = dict(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=num_classes,
        **kw,
    )
    return _randomize(TimmViT(**kw), seed)


def _clip_visual(seed=0, quick_gelu=False):
    v = ClipVisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        width=WIDTH,
        layers=DEPTH,
        heads=HEADS,
        mlp_ratio=4.0,
        output_dim=16,
        act_layer=QuickGELU if quick_gelu else torch.nn.GELU,
    )
    return _randomize(v, seed)


def _text_keys(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "token_embedding.weight": torch.randn(50, 32, generator=g),
        "logit_scale": torch.ones([]),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32, generator=g),
        "ln_final.weight": torch.ones(32),
        "text_projection": torch.randn(32, 16, generator=g),
    }


def _save(sd: dict, path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif path.endswith(".legacy.pth"):  # the pre-1.6 (non-zip) format of older releases
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)
    return path


def _convert(tmp_path, family, path, log=None, **kw):
    lines = []
    if family == "timm":
        kw = {**IMNET, **kw}
    model, params, report = importer.import_checkpoint(
        family, path, str(tmp_path / f"out_{family}"), heads=HEADS, log=lines.append, **kw
    )
    # What was written is what load_model (the distillation teacher loader) reads back, strictly.
    model2, params2, meta = model_io.load_model(str(tmp_path / f"out_{family}"))
    assert model2 == model
    return model2, params2, meta, "\n".join(lines)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("fmt", ["pth", "legacy.pth", "safetensors"])
def test_timm_vit_parity(tmp_path, fmt):
    m = _timm_vit(seed=1)
    path = _save(m.state_dict(), str(tmp_path / f"vit.{fmt}"))
    model, params, meta, _ = _convert(tmp_path, "timm", path)
    assert meta["input"] == {
        "image_size": SIZE,
        "mean": list(model_io.IMAGENET_MEAN),
        "std": list(model_io.IMAGENET_STD),
    }
    x = _images(0)
    ref_tokens, ref_probs = _timm_reference(m, x)
    out = _compare(f"timm ({fmt})", model, params, x, ref_tokens, ref_probs)
    with torch.no_grad():
        logits = m.forward_head(m.forward_features(x)).numpy()
    assert np.abs(np.asarray(out["logits"]) - logits).max() < TOL


def test_deit_distilled_parity_drops_head_dist(tmp_path):
    m = _randomize(
        VisionTransformerDistilled(
            img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=10
        ),
        seed=2,
    )
    path = _save({"model": m.state_dict()}, str(tmp_path / "deit.pth"))
    model, params, meta, log = _convert(tmp_path, "deit", path)
    assert model.dist_token and model.num_prefix == 2
    assert "head_dist" in log and "DeiT distillation head" in log
    assert "head_dist.*" not in str(params) and "head_dist" in str(meta["converted_from"]["dropped"])
    x = _images(1)
    ref_tokens, ref_probs = _timm_reference(m, x)
    _compare("deit distilled (.pth, {'model': sd})", model, params, x, ref_tokens, ref_probs)


def test_mae_parity_drops_decoder(tmp_path):
    m = _timm_vit(seed=3, num_classes=0)
    with torch.no_grad():  # MAE's fixed 2-D sin-cos embedding, loaded as the parameter
        m.pos_embed.copy_(torch.from_numpy(sincos_posemb_2d(SIZE // PATCH, WIDTH, 1)))
    sd = dict(m.state_dict())
    g = torch.Generator().manual_seed(3)
    sd["mask_token"] = torch.randn(1, 1, 32, generator=g)
    sd["decoder_embed.weight"] = torch.randn(32, WIDTH, generator=g)
    sd["decoder_pos_embed"] = torch.randn(1, 17, 32, generator=g)
    for i in range(2):
        sd[f"decoder_blocks.{i}.attn.qkv.weight"] = torch.randn(96, 32, generator=g)
        sd[f"decoder_blocks.{i}.norm1.weight"] = torch.ones(32)
    sd["decoder_norm.weight"] = torch.ones(32)
    sd["decoder_pred.weight"] = torch.randn(PATCH * PATCH * 3, 32, generator=g)
    path = _save({"model": sd}, str(tmp_path / "mae_pretrain.pth"))
    model, params, meta, log = _convert(tmp_path, "mae", path)
    assert "MAE decoder: 8 tensors" in log and "MAE mask token: 1 tensor" in log
    assert model.posemb == "sincos2d" and model.num_classes == 0
    np.testing.assert_array_equal(params["pos_embed"], m.pos_embed.detach().numpy())
    x = _images(2)
    ref_tokens, ref_probs = _timm_reference(m, x)
    _compare("mae ({'model': sd}, decoder dropped)", model, params, x, ref_tokens, ref_probs)


def test_mae_training_checkpoint_with_args_namespace(tmp_path):
    """weights_only=True refuses argparse.Namespace; the code-free reader takes over, still parity."""
    m = _timm_vit(seed=4, num_classes=0)
    path = str(tmp_path / "checkpoint-799.pth")
    args = argparse.Namespace(lr=1e-3, model="mae")
    torch.save({"model": m.state_dict(), "epoch": 799, "args": args}, path)
    model, params, _, log = _convert(tmp_path, "mae", path)
    assert "code-free reader" in log
    x = _images(3)
    _compare("mae (training checkpoint with args)", model, params, x, *_timm_reference(m, x))


@pytest.mark.parametrize("layout", ["plain", "full_checkpoint"])
def test_dino_parity(tmp_path, layout):
    m = _timm_vit(seed=5, num_classes=0)
    if layout == "plain":
        obj = m.state_dict()
    else:  # DINO's *_full_checkpoint.pth: teacher = MultiCropWrapper(backbone, DINOHead)
        teacher = {f"backbone.{k}": v for k, v in m.state_dict().items()}
        teacher.update(
            {"head.mlp.0.weight": torch.randn(128, WIDTH), "head.last_layer.weight_g": torch.ones(256, 1)}
        )
        obj = {"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 100}
    path = _save(obj, str(tmp_path / "dino.pth"))
    model, params, _, log = _convert(tmp_path, "dino", path)
    if layout == "full_checkpoint":
        assert "checkpoint['teacher']" in log and "DINO projection head: 2 tensors" in log
    x = _images(4)
    _compare(f"dino ({layout})", model, params, x, *_timm_reference(m, x))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_open_clip_parity(tmp_path, fmt):
    v = _clip_visual(seed=6)
    sd = {f"visual.{k}": t for k, t in v.state_dict().items()}
    sd.update(_text_keys())
    path = _save({"state_dict": sd} if fmt == "bin" else sd, str(tmp_path / f"open_clip_model.{fmt}"))
    model, params, meta, log = _convert(tmp_path, "open_clip", path)
    assert "outside the visual tower: 5 tensors" in log
    assert model.act == "gelu" and model.ln_pre and not model.patch_bias and model.norm_eps == 1e-5
    assert meta["input"]["mean"] == list(CLIP_INPUT["mean"])
    x = _images(5)
    ref_tokens, ref_probs, ref_emb = _clip_reference(v, x)
    out = _compare(f"open_clip (.{fmt})", model, params, x, ref_tokens, ref_probs)
    assert np.abs(np.asarray(out["embedding"]) - ref_emb).max() < TOL


class _ClipWrapper(torch.nn.Module):
    """Mimics an OpenAI CLIP archive: the visual tower under 'visual' beside text-tower tensors."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.token_embedding = torch.nn.Embedding(50, 32)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.register_buffer("attn_mask", torch.zeros(8, 8))

    def forward(self, image):
        return self.visual(image)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "torchscript_fp16", "state_dict"])
def test_openai_clip_parity(tmp_path, fmt):
    v = _clip_visual(seed=7, quick_gelu=True)
    wrapper = _ClipWrapper(v).eval()
    path = str(tmp_path / "ViT-tiny.pt")
    if fmt.startswith("torchscript"):
        traced = torch.jit.trace(wrapper, _images(9), check_trace=False)
        if fmt.endswith("fp16"):  # OpenAI's released archives hold fp16 weights
            traced.half()
            v.half().float()  # the reference uses the same rounded weights, in fp32
        torch.jit.save(traced, path)
        assert torch_io.is_torchscript(path)
    else:
        torch.save(wrapper.state_dict(), path)
    model, params, _, log = _convert(tmp_path, "clip", path)
    if fmt.startswith("torchscript"):
        assert "TorchScript archive; reading its tensors only" in log
    assert model.act == "quick_gelu" and model.proj_dim == 16
    x = _images(6)
    ref_tokens, ref_probs, ref_emb = _clip_reference(v, x)
    out = _compare(f"clip ({fmt})", model, params, x, ref_tokens, ref_probs)
    assert np.abs(np.asarray(out["embedding"]) - ref_emb).max() < TOL


def test_code_free_reader_matches_torch_load(tmp_path):
    """Our zip reader against torch.load: dtypes (fp16/bf16/fp64), shared storages, views, offsets."""
    base = torch.randn(6, 10)
    obj = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(3).double(),
        "view": base[1:4, 2:7],
        "transposed": base.t(),
        "shared": base,
        "scalar": torch.tensor(3.5),
        "int": torch.arange(4),
    }
    path = str(tmp_path / "mixed.pth")
    torch.save(obj, path)
    ours = torch_io.read_torch_zip(path)
    ref = torch.load(path, weights_only=True)
    for k, t in ref.items():
        expect = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        got = np.asarray(ours[k], np.float32) if t.dtype == torch.bfloat16 else ours[k]
        assert got.shape == expect.shape, k
        np.testing.assert_array_equal(got, expect, err_msg=k)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_code_free_reader_never_runs_pickled_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    m = _timm_vit(seed=8, num_classes=0)
    path = str(tmp_path / "evil.pth")
    torch.save({"model": m.state_dict(), "payload": _Evil()}, path)
    model, params, _, log = _convert(tmp_path, "timm", path)
    assert not marker.exists(), "a pickled callable was executed"
    assert "code-free reader" in log
    x = _images(7)
    _compare("timm (checkpoint with a malicious object)", model, params, x, *_timm_reference(m, x))


# ------------------------------------------------------------------------------------------------ options


def test_image_size_resamples_position_embedding(tmp_path):
    m = _timm_vit(seed=10, num_classes=0)
    path = _save(m.state_dict(), str(tmp_path / "vit.pth"))
    model, params, meta, log = _convert(tmp_path, "timm", path, image_size=48)
    assert model.image_size == 48 and meta["input"]["image_size"] == 48
    assert params["pos_embed"].shape == (1, 1 + 36, WIDTH)
    assert meta["converted_from"]["original_image_size"] == SIZE and "4x4 -> 6x6" in log
    expect = resample_posemb(m.pos_embed.detach().numpy(), 1, 6)
    np.testing.assert_allclose(params["pos_embed"], np.asarray(expect), atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        importer.import_checkpoint(
            "timm", path, str(tmp_path / "bad"), heads=HEADS, image_size=50, **IMNET, log=lambda s: None
        )


def test_cli_import_options_are_recorded(tmp_path, capsys):
    m = _timm_vit(seed=18, num_classes=0)
    path = _save(m.state_dict(), str(tmp_path / "vit.safetensors"))
    out = str(tmp_path / "cli_out")
    flags = "--heads 4 --act quick_gelu --norm-eps 1e-5 --mean 0.5 0.5 0.5 --std 0.25 0.25 0.25".split()
    assert cli_main(["import", "--family", "timm", "--input", path, "--output", out, *flags]) == 0
    assert "wrote " in capsys.readouterr().out
    model, _, meta = model_io.load_model(out)
    assert model.act == "quick_gelu" and model.norm_eps == 1e-5 and model.num_heads == 4
    assert meta["input"]["mean"] == [0.5] * 3 and meta["input"]["std"] == [0.25] * 3
    assert meta["converted_from"]["family"] == "timm" and meta["converted_from"]["file"] == "vit.safetensors"


def test_heads_default_table_and_errors(tmp_path):
    m = _timm_vit(seed=11, num_classes=0)
    path = _save(m.state_dict(), str(tmp_path / "vit.pth"))
    with pytest.raises(ConfigError, match="no default head count.*--heads"):
        importer.import_checkpoint("timm", path, str(tmp_path / "o"), **IMNET, log=lambda s: None)
    with pytest.raises(ConfigError, match="does not divide"):
        importer.import_checkpoint("timm", path, str(tmp_path / "o"), heads=5, **IMNET, log=lambda s: None)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    big = {k: v for k, v in sd.items()}
    big["patch_embed.proj.weight"] = np.zeros((384, 3, 16, 16), np.float32)
    big["pos_embed"] = np.zeros((1, 1 + 14 * 14, 384), np.float32)
    arch = families.infer_arch(families.get_family("timm"), big)
    assert arch["num_heads"] == 6 and arch["patch_size"] == 16 and arch["image_size"] == 224


def test_mismatched_checkpoints_list_the_problems(tmp_path):
    m = _timm_vit(seed=12, num_classes=0)
    sd = dict(m.state_dict())
    # wrong family: a timm checkpoint read as CLIP
    path = _save(sd, str(tmp_path / "vit.pth"))
    with pytest.raises(CheckpointError, match="conv1.weight.*--family=clip"):
        importer.import_checkpoint("clip", path, str(tmp_path / "o"), heads=HEADS, log=lambda s: None)
    # truncated + mis-shaped + unexpected keys, all listed in one message
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.weight"]
    bad["blocks.1.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
    bad["fc_norm.weight"] = torch.ones(WIDTH)
    path = _save(bad, str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError) as err:
        importer.import_checkpoint(
            "timm", path, str(tmp_path / "o"), heads=HEADS, **IMNET, log=lambda s: None
        )
    msg = str(err.value)
    assert "missing (1): blocks.1.mlp.fc2.weight" in msg
    assert "unexpected (1): fc_norm.weight" in msg
    assert f"blocks.1.attn.proj.weight: expected ({WIDTH}, {WIDTH}), got ({WIDTH}, {WIDTH + 1})" in msg
    # an open_clip tower of the wrong size: shape mismatches in the checkpoint's own 'visual.' names
    v = _clip_visual(seed=13).state_dict()
    v = {f"visual.{k}": t for k, t in v.items()}
    v["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(128, WIDTH)
    path = _save(v, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight: exp"):
        importer.import_checkpoint("open_clip", path, str(tmp_path / "o"), heads=HEADS, log=lambda s: None)
    # not a state dict at all
    path = str(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "note": "nothing"}, path)
    with pytest.raises(CheckpointError, match="no tensors at the top level"):
        importer.import_checkpoint(
            "timm", path, str(tmp_path / "o"), heads=HEADS, **IMNET, log=lambda s: None
        )


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.pth")
    assert cli_main(["import", "--family", "timm", "--input", missing, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err
    url = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    assert cli_main(["import", "--family", "mae", "--input", url, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "never downloads" in err and "mae_pretrain_vit_base.pth" in err and err.count("\n") == 0
    assert (
        cli_main(
            [
                "import",
                "--family",
                "timm",
                "--input",
                "timm/vit_base_patch16_224.augreg_in21k",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "hub name" in capsys.readouterr().err


def test_cli_subprocess_missing_file_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_distill_jax.teachers",
            "import",
            "--family",
            "clip",
            "--input",
            "https://openaipublic.azureedge.net/clip/models/x/ViT-B-16.pt",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 2 and "ViT-B-16.pt" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("src", ["timm", "clip"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_export_round_trip_into_timm(tmp_path, src, fmt):
    if src == "timm":
        ref = _timm_vit(seed=14, num_classes=0)
        path = _save(ref.state_dict(), str(tmp_path / "in.pth"))
    else:  # CLIP-style: ln_pre, QuickGELU, no patch bias, eps 1e-5, proj
        wrapper = _ClipWrapper(_clip_visual(seed=15, quick_gelu=True))
        path = _save(wrapper.state_dict(), str(tmp_path / "in.pt"))
    directory = str(tmp_path / "ours")
    norm = IMNET if src == "timm" else {}
    importer.import_checkpoint(src, path, directory, heads=HEADS, **norm, log=lambda s: None)
    out_path = str(tmp_path / f"student.{fmt}")
    assert cli_main(["export", "--input", directory, "--output", out_path]) == 0
    _, kwargs, name = importer.export_timm(directory, out_path, log=lambda s: None)
    model, params, _ = model_io.load_model(directory)
    extra = {}
    if model.norm_eps != 1e-6:
        import functools

        extra["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=model.norm_eps)
    tm = timm.create_model(name, pretrained=False, **kwargs, **extra).eval()
    if fmt == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(out_path)
    else:
        sd = torch.load(out_path, weights_only=True)
    tm.load_state_dict(sd, strict=True)
    x = _images(8)
    with torch.no_grad():
        ref_tokens = tm.forward_features(x).numpy()
    out, _ = _ours(model, params, x)
    err = float(np.abs(np.asarray(out["tokens"]) - ref_tokens).max())
    print(f"\n[parity] export {src} -> timm ({fmt}): tokens max|err|={err:.2e}")
    assert err < TOL


def test_layouts_round_trip_exactly():
    for family, module in (("timm", _timm_vit(seed=16)), ("clip", _clip_visual(seed=17))):
        fam = families.get_family(family)
        sd = {k: v.numpy() for k, v in module.state_dict().items()}
        model, params, _ = families.import_state_dict(family, sd, heads=HEADS, log=lambda s: None)
        back = families.from_flax(fam, model, params)
        assert set(back) == set(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_save_state_dict_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError, match="safetensors or .pth"):
        torch_io.save_state_dict({"a": np.zeros(2, np.float32)}, str(tmp_path / "x.npz"))
