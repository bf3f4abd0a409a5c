"""C-RADIO v3/v4 (timm's ``vit_*_patch16_radio_v3/v4``) against timm loading the same file.

RADIO stores its position table for a 128x128 patch grid and timm's loader resamples it to the model's
grid (bilinear, no antialias, ``align_corners`` per checkpoint). Here random-weight reduced models of the
real architectures (width 64, depth 2, 2 heads; registers, LayerScale where the size has it, the
patch-only position table and the missing final norm kept) are saved with a 16x16 grid standing in for
128x128. timm loads each through its own checkpoint filter (``pretrained_cfg_overlay=dict(file=...)``, so
timm does the resampling) at the resolutions below; ours converts the same file for the same resolution.
Tokens, every attention map and the summary (the CLS token) must agree within 1e-5 in fp32 (tokens and
summary relative to the largest token: no final norm); ``pytest -s`` prints one ``[parity]`` line per
case (docs/CONVERT.md records them). Then the same by ``hf-hub:`` name from an offline hub cache,
against timm's own hub loader, and the known RADIO teachers.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion tests need torch: bash scripts/install_torch_cpu.sh")
pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

from hybrid_distill_jax.models import io as model_io  # noqa: E402
from hybrid_distill_jax.teachers import hub, importer, known, timm_config  # noqa: E402
from hybrid_distill_jax.teachers.__main__ import main as cli_main  # noqa: E402
from hybrid_distill_jax.teachers.families.base import CLIP_INPUT  # noqa: E402
from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops  # noqa: E402
from tests.helpers import add_to_hub_cache, hub_commit  # noqa: E402
from tests.torch_reference import randomize  # noqa: E402

declare_torchvision_ops()
timm = pytest.importorskip("timm", reason="conversion tests need timm: bash scripts/install_torch_cpu.sh")
from safetensors.torch import save_file  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

FP32_TOL = 1e-5
REDUCED = dict(embed_dim=64, depth=2, num_heads=2)
STORED_GRID = 16  # the saved table's patch grid, standing in for RADIO's 128x128
PATCH = 16
ALIGN_CORNERS = {"vit_base_patch16_radio_v3": True, "vit_huge_patch16_radio_v3": True}  # timm's choice
# (architecture, input size): grids of 8 and 13 (down, by an integer and a fractional factor) and 20 (up)
CASES = [
    ("vit_base_patch16_radio_v3", 128),
    ("vit_base_patch16_radio_v3", 208),
    ("vit_large_patch16_radio_v3", 128),
    ("vit_large_patch16_radio_v3", 208),
    ("vit_huge_patch16_radio_v3", 320),
    ("vit_so400m_patch16_radio_v4", 320),
]
HUB_REPO = "timm/vit_base_patch16_radio_v3.c_radio"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """architecture -> timm's ``save_for_hf`` directory (model.safetensors + config.json) of a reduced,
    randomised model whose position table has the stored grid."""
    base = tmp_path_factory.mktemp("radio")
    out = {}
    for i, arch in enumerate(sorted({a for a, _ in CASES})):
        m = timm.create_model(arch, pretrained=False, img_size=STORED_GRID * PATCH, **REDUCED)
        randomize(m, seed=40 + i)
        directory = str(base / arch)
        save_for_hf(m, directory, safe_serialization=True)
        out[arch] = directory
    return out


def _timm_loaded(arch: str, weights: str, size: int):
    """timm's model for ``size`` px, the file read by timm's own loader and checkpoint filter."""
    m = timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay=dict(file=weights), img_size=size, **REDUCED
    )
    return m.eval()


def _reference(m, x):
    """(tokens, {layer: attention probabilities}, summary) of a timm ViT: each block's probabilities as
    its unfused attention hands them to dropout, the summary as ``forward_head(pre_logits=True)``."""
    probs, hooks = {}, []
    for i, blk in enumerate(m.blocks):
        blk.attn.fused_attn = False
        hooks.append(
            blk.attn.attn_drop.register_forward_hook(
                lambda mod, args, out, layer=i + 1: probs.__setitem__(layer, out.numpy())
            )
        )
    try:
        with torch.no_grad():
            tokens = m.forward_features(x)
            summary = m.forward_head(tokens, pre_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens.numpy(), probs, summary.numpy()


def _errors(model, params, m, x) -> tuple[dict, float]:
    """Max |ours - timm| of the tokens, every layer's attention probabilities and the summary, and
    timm's max |token| (without a final norm the residual stream is returned as it grew)."""
    ref_tokens, ref_probs, ref_summary = _reference(m, x)
    layers = tuple(range(1, model.depth + 1))
    out = model.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), attn_layers=layers)
    assert set(ref_probs) == set(layers)
    errors = dict(
        tokens=float(np.abs(np.asarray(out["tokens"]) - ref_tokens).max()),
        attn=max(
            float(np.abs(np.asarray(jax.nn.softmax(out["attn_logits"][k], -1)) - ref_probs[k]).max())
            for k in layers
        ),
        summary=float(np.abs(np.asarray(out["pooled"]) - ref_summary).max()),
    )
    return errors, float(np.abs(ref_tokens).max())


def _within(errors: dict, scale: float) -> bool:
    """Attention probabilities within 1e-5; tokens and summary within 1e-5 of the largest token
    magnitude (a few units here: float32 keeps about 7 digits of it)."""
    bound = FP32_TOL * max(1.0, scale)
    return errors["attn"] <= FP32_TOL and errors["tokens"] <= bound and errors["summary"] <= bound


def _x(size: int, seed: int = 0):
    return torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,size", CASES)
def test_radio_parity_with_timms_loader(saved, tmp_path, arch, size):
    """The file with timm's config.json beside it, imported as a hub name is (``--family timm``: the
    config's architecture picks the RADIO family, hence align_corners), for ``size`` px."""
    start = time.perf_counter()
    weights = os.path.join(saved[arch], hub.WEIGHTS)
    family = timm_config.RADIO_FAMILIES[arch]
    align = ALIGN_CORNERS.get(arch, False)
    lines: list[str] = []
    model, params, report = importer.import_checkpoint(
        "timm", weights, str(tmp_path / "out"), image_size=size, log=lines.append
    )
    meta = model_io.read_model_json(str(tmp_path / "out"))
    assert report["family"] == family == meta["converted_from"]["family"]
    assert family == ("radio_align_corners" if align else "radio")
    grid = size // PATCH
    assert meta["converted_from"]["resampled"] == (
        f"position table {STORED_GRID}x{STORED_GRID} -> {grid}x{grid} (bilinear, align_corners={align}, "
        "no antialias: timm's C-RADIO loader)"
    )
    assert "original_image_size" not in meta["converted_from"]
    assert meta["input"] == {
        "image_size": size,
        "mean": list(CLIP_INPUT["mean"]),
        "std": list(CLIP_INPUT["std"]),
    }
    m = _timm_loaded(arch, weights, size)
    registers = m.reg_token.shape[1]
    assert (model.image_size, model.num_registers, model.class_token) == (size, registers, True)
    assert not model.prefix_posemb and not model.final_norm and model.pool == "cls"
    assert (model.layer_scale_init is not None) == ("init_values" in timm_config.ARCHITECTURES[arch])
    table = float(np.abs(params["pos_embed"] - m.pos_embed.detach().numpy()).max())
    errors, scale = _errors(model, params, m, _x(size))
    print(
        f"\n[parity] {arch} ({family}: align_corners {align}, {registers} registers) {STORED_GRID}x"
        f"{STORED_GRID} -> {grid}x{grid} ({size} px): max|err| position table {table:.1e}, "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + f" (max|tokens| {scale:.1f}) [{time.perf_counter() - start:.1f} s]"
    )
    assert table <= 1e-6 and _within(errors, scale), errors


def test_bare_file_takes_align_corners_from_the_family_flag(saved, tmp_path, capsys):
    """A state dict with no config.json beside it: ``--family radio_align_corners`` is C-RADIOv3-B's
    resampling (timm's table), ``--family radio`` another table; both convert through the CLI."""
    arch, size = "vit_base_patch16_radio_v3", 208
    bare = str(tmp_path / "radio_v3_b.safetensors")
    sd = _timm_loaded(arch, os.path.join(saved[arch], hub.WEIGHTS), STORED_GRID * PATCH).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, bare)
    want = _timm_loaded(arch, bare, size).pos_embed.detach().numpy()
    gaps = {}
    for family in ("radio_align_corners", "radio"):
        out = str(tmp_path / family)
        argv = ["import", "--family", family, "--input", bare, "--output", out, "--image-size", str(size)]
        argv += ["--heads", "2"]  # a bare file does not record it (the reduced width has no default)
        assert cli_main(argv) == 0
        log = capsys.readouterr().out
        assert f"align_corners={family == 'radio_align_corners'}" in log, log
        model, params, meta = model_io.load_model(out)
        assert meta["converted_from"]["family"] == family and model.image_size == size
        assert meta["input"]["mean"] == list(CLIP_INPUT["mean"])
        gaps[family] = float(np.abs(np.asarray(params["pos_embed"]) - want).max())
    shown = ", ".join(f"--family {k} {v:.1e}" for k, v in gaps.items())
    print(f"\n[parity] {arch} bare file, 16x16 -> 13x13: position table max|err| {shown}")
    assert gaps["radio_align_corners"] <= 1e-6 and gaps["radio"] > 1e-2, gaps
    # without --image-size: the family's 512 px
    model, _, _ = importer.import_checkpoint(
        "radio", bare, str(tmp_path / "default"), heads=2, log=lambda s: None
    )
    assert model.image_size == 512


def _as_published(source: str, target: str) -> dict:
    """The timm config.json at ``source`` as the real C-RADIO repos publish it (written to ``target``):
    model_args leave the input size to the factory, the pretrained config says 512 px."""
    with open(source) as f:
        cfg = json.load(f)
    cfg["model_args"].pop("img_size")
    cfg["pretrained_cfg"]["input_size"] = [3, 512, 512]
    with open(target, "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


@pytest.mark.skipif(
    not os.environ.get("HD_FULL_SIZE_RADIO"), reason="full-size C-RADIO: HD_FULL_SIZE_RADIO=1"
)
@pytest.mark.parametrize("arch", ["vit_base_patch16_radio_v3", "vit_large_patch16_radio_v3"])
def test_full_size_parity(tmp_path, arch):
    """The real architecture and its real 128x128 stored grid (random weights), converted as a hub name
    is (config.json input size 512) against timm loading the file; opt-in: 20 s (B) and 50 s (L) here."""
    start = time.perf_counter()
    m = randomize(timm.create_model(arch, pretrained=False, img_size=128 * PATCH, weight_init="skip"), 3)
    directory = str(tmp_path / "export")
    save_for_hf(m, directory, safe_serialization=True)
    del m
    _as_published(os.path.join(directory, hub.CONFIG), os.path.join(directory, hub.CONFIG))
    weights = os.path.join(directory, hub.WEIGHTS)
    model, params, report = importer.import_checkpoint(
        "timm", weights, str(tmp_path / "out"), log=lambda s: None
    )
    assert model.image_size == 512 and "128x128 -> 32x32" in report["resampled"]
    ref = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=weights)).eval()
    table = float(np.abs(params["pos_embed"] - ref.pos_embed.detach().numpy()).max())
    errors, scale = _errors(model, params, ref, _x(512)[:1])
    print(
        f"\n[parity] full-size {arch} ({report['family']}) 128x128 -> 32x32 (512 px): max|err| position "
        f"table {table:.1e}, "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + f" (max|tokens| {scale:.1f}) [{time.perf_counter() - start:.0f} s]"
    )
    assert table <= 1e-6 and _within(errors, scale), errors


# ------------------------------------------------------------------------------------------------ by name


@pytest.fixture
def radio_hub(saved, tmp_path, monkeypatch):
    """An offline hub cache holding HUB_REPO as timm publishes it: the reduced weights (16x16 stored
    grid), a config.json whose model_args leave the input size to the factory (512 px, as the real
    repos do)."""
    arch = HUB_REPO.split("/")[1].split(".")[0]
    config = str(tmp_path / hub.CONFIG)
    cfg = _as_published(os.path.join(saved[arch], hub.CONFIG), config)
    cache = str(tmp_path / "hf" / "hub")
    files = {hub.CONFIG: config, hub.WEIGHTS: os.path.join(saved[arch], hub.WEIGHTS)}
    add_to_hub_cache(cache, HUB_REPO, files, hub_commit(HUB_REPO))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "converted"))
    return cfg


def test_radio_by_hub_name_against_timms_hub_loader(radio_hub):
    name = known.hub_name("radio_v3_b16")
    assert name == hub.PREFIX + HUB_REPO
    described = hub.describe(name)  # from the cached config.json alone
    lines: list[str] = []
    directory = hub.resolve(name, log=lines.append)
    assert any(line.endswith("(family radio_align_corners)") for line in lines), lines
    model, params, meta = model_io.load_model(directory)
    assert described["arch"] == meta["arch"] and described["input"] == meta["input"]
    assert meta["input"]["image_size"] == model.image_size == 512
    assert "align_corners=True" in meta["converted_from"]["resampled"]
    assert meta["converted_from"]["hub"]["repo"] == HUB_REPO
    m = timm.create_model(name, pretrained=True).eval()  # timm's own hub loader, from the same cache
    assert m.patch_embed.grid_size == (32, 32)
    table = float(np.abs(params["pos_embed"] - m.pos_embed.detach().numpy()).max())
    errors, scale = _errors(model, params, m, _x(512))
    print(
        f"\n[parity] {name} (reduced, {STORED_GRID}x{STORED_GRID} -> 32x32 at 512 px): max|err| position "
        f"table {table:.1e}, "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + f" (max|tokens| {scale:.1f})"
    )
    assert table <= 1e-6 and _within(errors, scale), errors


def test_known_radio_teachers_are_timms(capsys):
    """Each RADIO short name: listed, and described (no file) as timm builds the full architecture on the
    meta device, at timm's input size, mean/std and licence."""
    from timm.models.vision_transformer import _RADIO_ALIGN_CORNERS

    for arch, family in timm_config.RADIO_FAMILIES.items():
        assert (family == "radio_align_corners") == any(n in arch for n in _RADIO_ALIGN_CORNERS), arch
    assert cli_main(["list"]) == 0
    listing = capsys.readouterr().out
    shorts = ["radio_v3_b16", "radio_v3_l16", "radio_v3_h16", "radio_v4_so400m16", "radio_v4_h16"]
    for short in shorts:
        t = known.KNOWN[short]
        row = next(line for line in listing.splitlines() if line.startswith(short + " "))
        assert row.split(None, 4) == [short, t.hub, "512", "nvidia-open-model-license", t.what]
        arch, tag = t.hub.removeprefix("hf-hub:timm/").split(".")
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
        pcfg = full.pretrained_cfg
        assert tag == pcfg["tag"] and t.licence == pcfg["license"]
        assert [3, t.image_size, t.image_size] == list(pcfg["input_size"])
        assert tuple(t.input["mean"]) == tuple(pcfg["mean"]) and tuple(t.input["std"]) == tuple(pcfg["std"])
        a = timm_config.description(known.known_config(t.hub.removeprefix("hf-hub:")), short)["arch"]
        blk = full.blocks[0]
        assert (a["width"], a["depth"], a["num_heads"], a["mlp_dim"]) == (
            full.embed_dim,
            len(full.blocks),
            blk.attn.num_heads,
            blk.mlp.fc1.out_features,
        ), short
        assert (a["num_registers"], a["prefix_posemb"], a["final_norm"], a["image_size"]) == (
            full.reg_token.shape[1],
            False,
            False,
            512,
        ), short
        assert (a["layer_scale_init"] is not None) == isinstance(blk.ls1, timm.layers.LayerScale), short
        assert full.patch_embed.grid_size == (32, 32)
