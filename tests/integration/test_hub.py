"""Teachers by ``hf-hub:`` name, offline, against a hub cache laid out exactly as huggingface_hub does.

Each of the paper's teacher names, and each known DINOv2-reg, DINOv3 and SigLIP(2) name, gets a
random-weight timm model of its real architecture, reduced through ``model_args`` (depth 2, width 64,
2 heads, 64 px or 56 px for /14; registers, LayerScale, rotary embeddings and MAP heads kept) and saved
with timm's own ``save_for_hf`` (``model.safetensors`` + the real ``config.json`` shape). The files go into
``models--timm--NAME/{blobs,refs,snapshots}`` under their hub hashes, and everything runs with
``HF_HUB_OFFLINE=1``. Parity is against timm itself loading the same file; the measured maxima and the
two resolution times are printed (``pytest -s``) and recorded in docs/CONVERT.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hub tests need torch: bash scripts/install_torch_cpu.sh")
pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

import huggingface_hub  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

from hybrid_distill_jax import config_lib  # noqa: E402
from hybrid_distill_jax.errors import CheckpointError, ConfigError  # noqa: E402
from hybrid_distill_jax.models import io as model_io  # noqa: E402
from hybrid_distill_jax.teachers import hub, importer, known, timm_config  # noqa: E402
from hybrid_distill_jax.teachers.__main__ import main as cli_main  # noqa: E402
from hybrid_distill_jax.teachers.families.base import CLIP_INPUT  # noqa: E402
from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops  # noqa: E402
from tests.helpers import add_to_hub_cache, hub_commit  # noqa: E402
from tests.torch_reference import ours, randomize, timm_reference  # noqa: E402

declare_torchvision_ops()
timm = pytest.importorskip("timm", reason="hub tests need timm: bash scripts/install_torch_cpu.sh")
from safetensors.torch import load_file  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

TOL = 1e-4
REDUCED = dict(depth=2, embed_dim=64, num_heads=2)
# hub name -> input size of the reduced model (a 4x4 patch grid)
NAMES = {
    "timm/deit_base_patch16_224.fb_in1k": 64,
    "timm/vit_base_patch16_224.mae": 64,
    "timm/vit_base_patch16_clip_224.openai": 64,
    "timm/vit_large_patch14_clip_224.openai": 56,
    "timm/vit_base_patch16_224.dino": 64,
    "timm/vit_large_patch16_224.mae": 64,
}
# The known teachers with registers, LayerScale, rotary embeddings or a MAP head, reduced the same way
# while keeping what defines them (DINOv2's 4 registers, LayerScale and patch-only position table;
# DINOv3's rotary embeddings, registers and LayerScale in timm's Eva; SigLIP's missing CLS token, MAP
# head and So400m's mlp_ratio): hub name -> input size of the reduced model.
NEW_NAMES = {
    "timm/vit_base_patch14_reg4_dinov2.lvd142m": 56,
    "timm/vit_large_patch14_reg4_dinov2.lvd142m": 56,
    "timm/vit_base_patch16_dinov3.lvd1689m": 64,
    "timm/vit_large_patch16_dinov3.lvd1689m": 64,
    "timm/vit_base_patch16_siglip_224.webli": 64,
    "timm/vit_base_patch16_siglip_384.webli": 64,
    "timm/vit_base_patch16_siglip_224.v2_webli": 64,
    "timm/vit_base_patch16_siglip_384.v2_webli": 64,
    "timm/vit_so400m_patch14_siglip_224.webli": 56,
    "timm/vit_so400m_patch14_siglip_384.webli": 60,  # like 384 px at /14: timm ignores the last 4 px
    "timm/vit_so400m_patch14_siglip_224.v2_webli": 56,
    "timm/vit_so400m_patch14_siglip_378.v2_webli": 56,
}
ALL_NAMES = {**NAMES, **NEW_NAMES}
MAE = "hf-hub:timm/vit_base_patch16_224.mae"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (timm's save_for_hf directory, the timm model) for every teacher name."""
    base = tmp_path_factory.mktemp("timm_exports")
    out = {}
    for i, (repo, size) in enumerate(ALL_NAMES.items()):
        model = timm.create_model(repo.split("/")[1], pretrained=False, img_size=size, **REDUCED)
        randomize(model, seed=100 + i)
        directory = str(base / repo.split("/")[1])
        save_for_hf(model, directory, safe_serialization=True)
        out[repo] = (directory, model)
    return out


@pytest.fixture
def hub_env(tmp_path, exports, monkeypatch):
    """A fresh hub cache holding every name, HF_HUB_OFFLINE on, and a fresh conversion cache."""
    cache = str(tmp_path / "hf" / "hub")
    for repo, (directory, _) in exports.items():
        files = {f: os.path.join(directory, f) for f in (hub.CONFIG, hub.WEIGHTS)}
        add_to_hub_cache(cache, repo, files, hub_commit(repo))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "converted"))
    env = {
        **os.environ,
        "HF_HUB_CACHE": cache,
        "HF_HUB_OFFLINE": "1",
        hub.CACHE_ENV: str(tmp_path / "converted"),
        "JAX_PLATFORMS": "cpu",
    }
    return cache, env


def _x(size, seed=0):
    return torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ tests


def test_cache_is_laid_out_as_huggingface_hub_does(hub_env):
    cache, _ = hub_env
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    assert {r.repo_id for r in info.repos} == set(ALL_NAMES)
    for r in info.repos:
        (rev,) = r.revisions
        assert rev.commit_hash == hub_commit(r.repo_id) and "main" in rev.refs
        assert {f.file_name for f in rev.files} == {hub.CONFIG, hub.WEIGHTS}
    path = huggingface_hub.hf_hub_download("timm/vit_base_patch16_224.mae", hub.WEIGHTS)  # offline
    assert os.path.realpath(path).startswith(os.path.realpath(cache))


def _parity(repo: str, size: int, label: str):
    """Resolves ``hf-hub:repo`` and compares it with timm building the config's architecture (its QuickGELU
    variant for OpenAI CLIP weights) from the same cached file; returns (model, meta, cfg, x, tokens)."""
    directory = hub.resolve(hub.PREFIX + repo, log=lambda s: None)
    model, params, meta = model_io.load_model(directory)
    weights = huggingface_hub.try_to_load_from_cache(repo, hub.WEIGHTS)
    with open(huggingface_hub.try_to_load_from_cache(repo, hub.CONFIG)) as f:
        cfg = json.load(f)
    arch = cfg["architecture"]
    ref = timm.create_model(
        arch.replace("_clip_", "_clip_quickgelu_") if "_clip_" in repo else arch,
        pretrained=False,
        **cfg.get("model_args", {}),
    ).eval()
    ref.load_state_dict(load_file(weights), strict=True)
    x = _x(size)
    ref_tokens, ref_probs = timm_reference(ref, x)
    out, probs = ours(model, params, x)
    tok_err = float(np.abs(np.asarray(out["tokens"]) - ref_tokens).max())
    attn_err = max(float(np.abs(probs[k] - ref_probs[k]).max()) for k in ref_probs)
    print(
        f"\n[parity] {label} hf-hub:{repo}: tokens max|err|={tok_err:.2e}, "
        f"attention probs max|err|={attn_err:.2e}"
    )
    assert tok_err < TOL and attn_err < TOL
    return model, meta, cfg, x, np.asarray(out["tokens"])


@pytest.mark.parametrize("repo", list(NAMES))
def test_parity_per_name(hub_env, repo):
    """Our converted teacher against timm loading the same file: tokens and attention probabilities."""
    model, meta, cfg, x, tokens = _parity(repo, NAMES[repo], "reduced")
    pcfg = cfg["pretrained_cfg"]
    assert meta["input"]["mean"] == pcfg["mean"] and meta["input"]["std"] == pcfg["std"]
    assert meta["input"]["image_size"] == NAMES[repo] == model.image_size
    record = meta["converted_from"]["hub"]
    weights = huggingface_hub.try_to_load_from_cache(repo, hub.WEIGHTS)
    assert record["commit"] == hub_commit(repo) and record["revision"] == "main"
    assert record["sha256"] == os.path.basename(os.path.realpath(weights))
    assert model.num_heads == 2 and model.depth == 2 and model.width == 64
    clip = "_clip_" in repo
    assert model.norm_eps == (1e-5 if clip else 1e-6) and model.ln_pre == clip
    assert model.act == ("quick_gelu" if clip else "gelu")
    # timm's own hub loader reads the same cache and honours config.json's model_args
    by_name = timm.create_model(hub.PREFIX + repo, pretrained=True).eval()
    gap = float(np.abs(tokens - timm_reference(by_name, x)[0]).max())
    if clip:  # timm's vit_*_clip_* computes GELU where the OpenAI weights were trained with QuickGELU
        print(f"[parity] hf-hub:{repo}: vs timm's GELU tower {gap:.2e}")
        assert gap > 100 * TOL
    else:
        assert gap < TOL


def _reference(m, x):
    """(final-norm tokens, {layer: attention probs}, summary) from a timm VisionTransformer or Eva: each
    block's probabilities as its unfused attention hands them to dropout (after any rotary embedding),
    the summary as ``forward_head(pre_logits=True)`` pools it."""
    probs = {}
    hooks = []
    for i, blk in enumerate(m.blocks):
        blk.attn.fused_attn = False
        hooks.append(
            blk.attn.attn_drop.register_forward_hook(
                lambda mod, args, out, layer=i + 1: probs.__setitem__(layer, out.numpy())
            )
        )
    with torch.no_grad():
        tokens = m.forward_features(x)
        summary = m.forward_head(tokens, pre_logits=True)
    for hk in hooks:
        hk.remove()
    return tokens.numpy(), probs, summary.numpy()


_TIMM_POOL = {"cls": "token", "gap": "avg", "map": "map"}


@pytest.mark.parametrize("repo", list(NEW_NAMES))
def test_parity_registers_rope_and_map_head(hub_env, tmp_path, repo):
    """DINOv2-reg, DINOv3 and SigLIP by name: one conversion, in the layout the config's timm class has,
    against timm loading the same file: tokens, every layer's attention probabilities and the summary
    (timm built with the pooling the conversion chose: the CLS token for DINOv3)."""
    lines = []
    directory = hub.resolve(hub.PREFIX + repo, log=lines.append)
    assert sum(": converting commit" in line for line in lines) == 1
    model, params, meta = model_io.load_model(directory)
    weights = huggingface_hub.try_to_load_from_cache(repo, hub.WEIGHTS)
    with open(huggingface_hub.try_to_load_from_cache(repo, hub.CONFIG)) as f:
        cfg = json.load(f)
    eva = "_dinov3" in repo
    family = "dinov3" if eva else "timm"
    assert meta["converted_from"]["family"] == family == timm_config.settings(cfg, repo).family
    assert any(line.endswith(f"(family {family})") for line in lines)
    assert any("is a timm Eva: converting it as --family dinov3" in line for line in lines) == eva
    args = {**cfg.get("model_args", {}), "global_pool": _TIMM_POOL[model.pool]}
    ref = timm.create_model(cfg["architecture"], pretrained=False, **args).eval()
    ref.load_state_dict(load_file(weights), strict=True)
    x = _x(NEW_NAMES[repo])
    ref_tokens, ref_probs, ref_summary = _reference(ref, x)
    out, probs = ours(model, params, x)
    tok_err = float(np.abs(np.asarray(out["tokens"]) - ref_tokens).max())
    attn_err = max(float(np.abs(probs[k] - ref_probs[k]).max()) for k in ref_probs)
    sum_err = float(np.abs(np.asarray(out["pooled"]) - ref_summary).max())
    print(
        f"\n[parity] reduced hf-hub:{repo} ({family}, pool {model.pool}): tokens max|err|={tok_err:.2e}, "
        f"attention probs max|err|={attn_err:.2e}, summary max|err|={sum_err:.2e}"
    )
    assert tok_err < TOL and attn_err < TOL and sum_err < TOL
    assert len(ref_probs) == model.depth == 2 and model.width == 64 and model.num_heads == 2
    pcfg, notes = cfg["pretrained_cfg"], meta["converted_from"]["timm"]["notes"]
    assert meta["input"]["mean"] == pcfg["mean"] and meta["input"]["std"] == pcfg["std"]
    if "_dinov2" in repo:
        assert (model.num_registers, model.class_token, model.prefix_posemb) == (4, True, False)
        assert model.layer_scale_init is not None and model.pool == "cls" and model.image_size == 56
    elif eva:
        assert (model.posemb, model.num_registers, model.norm_eps, model.qkv_bias) == ("rope", 4, 1e-5, False)
        assert model.layer_scale_init is not None and model.pool == "cls"
        assert model.image_size == pcfg["input_size"][-1] == 256  # DINOv3's; rotary: any size runs
        assert any("global_pool 'avg' is timm's Eva default" in n for n in notes)
        # a local import of the same file at another size: rotary embeddings take it, no grid to check
        local, _, _ = importer.import_checkpoint(
            "timm", weights, str(tmp_path / "at128"), image_size=128, log=lambda s: None
        )
        assert (local.image_size, local.posemb) == (128, "rope")
    else:
        assert not model.class_token and model.pool == "map" and model.num_registers == 0
        assert meta["input"]["mean"] == [0.5, 0.5, 0.5]
        if "so400m" in repo:
            assert model.mlp_dim == int(64 * 3.7362)
        assert model.image_size == 56 if "so400m" in repo else 64
        if NEW_NAMES[repo] % model.patch_size:
            assert any("ignores the last 4 px" in n for n in notes)
    # timm's own hub loader reads the same cache and honours config.json's model_args
    by_name = timm.create_model(hub.PREFIX + repo, pretrained=True).eval()
    assert float(np.abs(np.asarray(out["tokens"]) - _reference(by_name, x)[0]).max()) < TOL


def test_known_teachers_are_described_without_any_file(hub_env, tmp_path, monkeypatch):
    """Every known teacher the hub cache here holds a reduced model of: ``hub.describe`` with no file at
    all (the known table) gives the model.json its conversion writes, but for the sizes reduced here,
    which are timm's own for the full architecture (built on the meta device)."""

    def refuse(*a, **k):
        raise AssertionError("describe must not download")

    monkeypatch.setattr(hub, "_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    listed = {t.hub.removeprefix(hub.PREFIX) for t in known.KNOWN.values()}
    # C-RADIO's names are resolved and described in tests/integration/test_convert_radio.py
    assert {n for n in listed if "_radio_" not in n} <= set(ALL_NAMES) and set(NEW_NAMES) <= listed
    converted = {
        repo: model_io.read_model_json(hub.resolve(hub.PREFIX + repo, log=lambda s: None))
        for repo in NEW_NAMES
    }
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "nothing_converted"))
    for short, teacher in known.KNOWN.items():
        repo = teacher.hub.removeprefix(hub.PREFIX)
        if repo not in NEW_NAMES:
            continue
        described = hub.describe(teacher.hub)
        assert described["described_from"] == dict(zip(("timm", "tag"), repo.split("/")[1].split(".")))
        with torch.device("meta"):
            full = timm.create_model(repo.split("/")[1], pretrained=False)
        patch = full.patch_embed.patch_size[0]
        size = full.pretrained_cfg["input_size"][-1]
        assert size == teacher.image_size, short
        sizes = dict(
            width=full.embed_dim,
            depth=len(full.blocks),
            num_heads=full.blocks[0].attn.num_heads,
            mlp_dim=full.blocks[0].mlp.fc1.out_features,
            image_size=size - size % patch,
        )
        if full.pos_embed is not None:  # a fixed grid: timm's own
            assert full.patch_embed.grid_size[0] * patch == sizes["image_size"], short
        want = converted[repo]
        assert described["arch"] == {**want["arch"], **sizes}, short
        assert described["input"] == {**want["input"], "image_size": sizes["image_size"]}, short


@pytest.mark.skipif(not os.environ.get("HD_FULL_SIZE_HUB"), reason="full-size teachers: HD_FULL_SIZE_HUB=1")
@pytest.mark.parametrize("repo", list(NAMES))
def test_full_size_parity(tmp_path, monkeypatch, repo):
    """The real architectures at full size (343 MB / 1.2 GB of random weights each); opt-in, minutes."""
    model = randomize(timm.create_model(repo.split("/")[1], pretrained=False), seed=7)
    save_for_hf(model, str(tmp_path / "export"), safe_serialization=True)
    del model
    cache = str(tmp_path / "hub")
    add_to_hub_cache(
        cache, repo, {f: str(tmp_path / "export" / f) for f in (hub.CONFIG, hub.WEIGHTS)}, "f" * 40
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "converted"))
    t0 = time.perf_counter()
    _parity(repo, 224, "full-size")
    t1 = time.perf_counter()
    hub.resolve(hub.PREFIX + repo, log=lambda s: None)
    t2 = time.perf_counter()
    print(f"[hub] full-size {repo}: first resolution + parity {t1 - t0:.1f} s, second {t2 - t1:.4f} s")


def test_description_without_weights_is_what_the_conversion_writes(hub_env, monkeypatch):
    """``hub.describe`` (deviceless compiles, validation) reads the cached config.json alone: its model.json
    equals the one converting the weights writes, for every listed name; afterwards it reads ours."""
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("describe must not download"))
    for repo in ALL_NAMES:
        described = hub.describe(hub.PREFIX + repo)
        assert described["described_from"]["timm"] == repo.split("/")[1].split(".")[0]
        converted = model_io.read_model_json(hub.resolve(hub.PREFIX + repo, log=lambda s: None))
        assert described["arch"] == converted["arch"], repo
        assert described["input"] == converted["input"], repo
        assert hub.describe(hub.PREFIX + repo) == converted  # now the conversion's own model.json


def test_second_resolution_neither_converts_nor_downloads(hub_env, monkeypatch):
    lines = []
    t0 = time.perf_counter()
    first = hub.resolve(MAE, log=lines.append)
    t1 = time.perf_counter()
    assert any("converting" in s for s in lines)

    def refuse(*a, **k):
        raise AssertionError("the second resolution must not convert or download")

    monkeypatch.setattr(importer, "import_checkpoint", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    lines.clear()
    t2 = time.perf_counter()
    second = hub.resolve(MAE, log=lines.append)
    t3 = time.perf_counter()
    assert second == first and any("cached conversion" in s for s in lines)
    print(
        f"\n[hub] {MAE}: first resolution {t1 - t0:.2f} s (verify + convert), second {t3 - t2:.4f} s (cached)"
    )
    # pinned to the commit: the same directory; the hub cache pruned: our own ref still finds it
    assert hub.resolve(f"{MAE}@{hub_commit(MAE[7:])}", log=lines.append) == first
    shutil.rmtree(os.path.join(hf_constants.HF_HUB_CACHE, "models--timm--vit_base_patch16_224.mae"))
    assert hub.resolve(MAE, log=lines.append) == first
    assert hub.resolve(f"{MAE}@{hub_commit(MAE[7:])}", log=lines.append) == first


def test_download_path_pins_the_weights_to_the_configs_commit(hub_env, monkeypatch):
    """The hf_hub_download route (taken when the local look-up misses), served offline by the library."""
    monkeypatch.setattr(hub, "_cached_files", lambda repo, revision: None)
    directory = hub.resolve(MAE, log=lambda s: None)
    record = model_io.read_model_json(directory)["converted_from"]["hub"]
    assert record["commit"] == hub_commit(MAE[7:])
    assert os.path.basename(directory).startswith(record["commit"])


def test_offline_and_missing_is_one_line_exit_2(hub_env, tmp_path, capsys):
    absent = "hf-hub:timm/vit_huge_patch14_224.mae"
    assert cli_main(["import", "--input", absent, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "timm/vit_huge_patch14_224.mae" in err and "config.json" in err and "HF_HUB_OFFLINE=1" in err
    assert "hf download timm/vit_huge_patch14_224.mae config.json model.safetensors" in err
    # an unknown revision of a cached repo, and malformed names
    assert cli_main(["import", "--input", MAE + "@v9", "--output", str(tmp_path / "o")]) == 2
    assert "--revision v9" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected hf-hub:ORG/NAME"):
        hub.resolve("hf-hub:vit_base_patch16_224.mae")
    assert cli_main(["import", "--input", MAE, "--heads", "12", "--output", str(tmp_path / "o")]) == 2
    assert "--heads cannot be combined" in capsys.readouterr().err


def test_a_file_that_does_not_match_its_hash_is_rejected_and_removed(hub_env):
    cache, _ = hub_env
    name = "hf-hub:timm/vit_base_patch16_224.dino"
    weights = huggingface_hub.try_to_load_from_cache(name[7:], hub.WEIGHTS)
    blob = os.path.realpath(weights)
    with open(blob, "r+b") as f:  # flip bytes in the middle of the tensor data
        f.seek(os.path.getsize(blob) // 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(
        CheckpointError, match=r"model.safetensors of timm/vit_base_patch16_224.dino has sha256"
    ):
        hub.resolve(name, log=lambda s: None)
    assert not os.path.lexists(blob) and not os.path.lexists(weights)
    assert not os.listdir(
        os.path.join(hub.cache_root(), "teachers", "models--timm--vit_base_patch16_224.dino")
    )


def test_cli_import_by_name_offline_and_concurrent_resolution(hub_env, tmp_path):
    """Two fresh processes resolving one name at once (without torch), then the 'must show' command."""
    _, env = hub_env
    out = str(tmp_path / "mae_b16")
    cmd = [sys.executable, "-m", "hybrid_distill_jax.teachers", "import", "--input", MAE, "--output", out]
    # torch and timm made unimportable: resolution reads safetensors with numpy and needs neither
    code = (
        "import sys; sys.modules['torch'] = sys.modules['timm'] = None\n"
        f"from hybrid_distill_jax.teachers import hub; print('DIR', hub.resolve({MAE!r}, log=print))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {line.split()[1] for o in outs for line in o.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1, outs
    assert sum(o.count(": converting commit") for o in outs) == 1, outs
    parent = os.path.dirname(dirs.pop())
    assert not [d for d in os.listdir(parent) if d.startswith(".converting-")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cached conversion" in r.stdout and "converting" not in r.stdout
    meta = model_io.read_model_json(out)
    assert meta["converted_from"]["hub"]["commit"] == hub_commit(MAE[7:])


def test_teacher_checkpoint_by_name_in_a_distill_config(hub_env, tmp_path, tfds_dir):
    """``teachers.mae.checkpoint=hf-hub:...`` through validation and the teacher loader, then a
    two-step run of the CLI with the name as a --config override."""
    from hybrid_distill_jax.tasks import build_task
    from tests.helpers import tiny_distill_config

    c = tiny_distill_config(str(tmp_path), tfds_dir, steps=2)
    c.teachers.mae.checkpoint = MAE
    config_lib.validate(c)
    task = build_task(c, 10)
    teacher = task.teachers["mae"]
    assert teacher.model.num_heads == 2 and teacher.grid == 4
    assert teacher.mean == tuple(model_io.IMAGENET_MEAN)
    _, env = hub_env
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_distill_jax.main",
            "--config",
            "tests/tiny_config.py",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.data_dir={tfds_dir}",
            f"--config.teachers.deit.checkpoint={c.teachers.deit.checkpoint}",
            f"--config.teachers.mae.checkpoint={MAE}",
            "--config.total_steps=2",
            "--config.checkpoint_every=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{MAE}: cached conversion" in r.stderr
    exported = model_io.read_model_json(str(tmp_path / "run" / "export"))
    assert exported["teachers"]["mae"]["hub"]["commit"] == hub_commit(MAE[7:])
    assert exported["teachers"]["deit"] == {"model_dir": c.teachers.deit.checkpoint}


def test_init_from_and_model_dir_take_names(hub_env, tfds_dir):
    """Fine-tuning starts from the hub teacher's weights; evaluation validates a hub model_dir."""
    import jax

    from hybrid_distill_jax.config_lib import base_config
    from hybrid_distill_jax.tasks import build_task
    from tests.helpers import tiny_common

    ft = tiny_common(base_config("finetune"), tfds_dir)
    ft.image_size, ft.init_from = 64, MAE
    config_lib.validate(ft)
    task = build_task(ft, 10)
    params = task.pretrained_params(task.init_params(jax.random.key(0)))
    _, teacher, _ = model_io.load_model(hub.resolve(MAE, log=lambda s: None))
    np.testing.assert_array_equal(
        params["block2"]["mlp"]["fc1"]["kernel"], teacher["block2"]["mlp"]["fc1"]["kernel"]
    )
    ev = base_config("evaluate")
    ev.model_dir = "hf-hub:timm/vit_base_patch16_224.dino"
    config_lib.validate(ev)


def test_timm_clip_tower_needs_its_config_or_flags(tmp_path, exports):
    """The silent-default case: a timm CLIP tower's bare state dict no longer converts with eps 1e-6 and
    ImageNet mean/std; with timm's config.json beside it, eps, act and mean/std come from there."""
    directory, model = exports["timm/vit_base_patch16_clip_224.openai"]
    bare = str(tmp_path / "bare" / hub.WEIGHTS)
    os.makedirs(os.path.dirname(bare))
    shutil.copy(os.path.join(directory, hub.WEIGHTS), bare)
    with pytest.raises(ConfigError, match="pass --act --norm-eps --mean R G B --std R G B"):
        importer.import_checkpoint("timm", bare, str(tmp_path / "o"), log=lambda s: None)
    ours_model, params, _ = importer.import_checkpoint(
        "timm", os.path.join(directory, hub.WEIGHTS), str(tmp_path / "o2"), log=lambda s: None
    )
    meta = model_io.read_model_json(str(tmp_path / "o2"))
    assert ours_model.norm_eps == 1e-5 and ours_model.num_heads == 2
    assert meta["input"]["mean"] == list(CLIP_INPUT["mean"])
    # a plain timm state dict without a config: eps/act are timm's defaults, mean/std must be given
    plain = str(tmp_path / "plain" / hub.WEIGHTS)
    os.makedirs(os.path.dirname(plain))
    shutil.copy(os.path.join(exports["timm/vit_base_patch16_224.dino"][0], hub.WEIGHTS), plain)
    with pytest.raises(
        ConfigError, match=r"does not record its input mean/std.*pass --mean R G B --std R G B"
    ):
        importer.import_checkpoint("timm", plain, str(tmp_path / "o3"), heads=2, log=lambda s: None)
    # a config.json naming an architecture the table does not know: eps and act are not guessed
    cfg = json.load(open(os.path.join(exports["timm/vit_base_patch16_224.dino"][0], hub.CONFIG)))
    cfg["architecture"] = "some_new_vit"
    with open(os.path.join(os.path.dirname(plain), hub.CONFIG), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=r"names 'some_new_vit'.*: pass --act --norm-eps \(the values"):
        importer.import_checkpoint("timm", plain, str(tmp_path / "o4"), log=lambda s: None)


def test_architecture_table_matches_timm():
    """teachers.timm_config.ARCHITECTURES against timm's own factories (built on the meta device): the
    description of each (as its config.json with timm's default pretrained_cfg would give it) has the
    model's every feature: sizes, eps, activation, CLS token, registers, position table, LayerScale,
    rotary embeddings, biases and pooling; and the family is the one of timm's model class."""
    from timm.layers import LayerScale
    from timm.models.eva import Eva

    acts = {"GELU": "gelu", "QuickGELU": "quick_gelu"}
    for arch in timm_config.ARCHITECTURES:
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False)
        pcfg = m.pretrained_cfg
        cfg = {
            "architecture": arch,
            "num_classes": m.num_classes,
            "global_pool": m.global_pool,
            "pretrained_cfg": {"tag": pcfg.get("tag"), "input_size": list(pcfg["input_size"])},
        }
        s = timm_config.settings(cfg, arch)
        got = timm_config.description(cfg, arch)["arch"]
        eva = isinstance(m, Eva)
        family = "dinov3" if eva else timm_config.RADIO_FAMILIES.get(arch, "timm")
        assert s.family == family and s.timm_class == type(m).__name__, arch
        blk = m.blocks[0]
        patch = m.patch_embed.patch_size[0]
        table_has_prefix = m.pos_embed is None or m.pos_embed.shape[1] > m.patch_embed.num_patches
        size = pcfg["input_size"][-1] - pcfg["input_size"][-1] % patch
        if m.pos_embed is not None:
            assert m.patch_embed.grid_size[0] * patch == size, arch
        layer_scale = blk.gamma_1 is not None if eva else isinstance(blk.ls1, LayerScale)
        if eva:
            pool = "cls" if not m.num_classes and m.global_pool == "avg" else {"token": "cls"}[m.global_pool]
        else:
            pool = {"token": "cls", "map": "map", "avg": "gap"}[m.global_pool]
        want = dict(
            patch_size=patch,
            width=m.embed_dim,
            depth=len(m.blocks),
            num_heads=blk.attn.num_heads,
            mlp_dim=blk.mlp.fc1.out_features,
            image_size=size,
            num_classes=m.num_classes,
            class_token=m.cls_token is not None,
            num_registers=0 if m.reg_token is None else m.reg_token.shape[1],
            ln_pre=not isinstance(m.norm_pre, torch.nn.Identity),
            final_norm=not isinstance(m.norm, torch.nn.Identity),
            patch_bias=m.patch_embed.proj.bias is not None,
            qkv_bias=(blk.attn.q_bias is not None) if eva else (blk.attn.qkv.bias is not None),
            norm_eps=blk.norm1.eps,
            act=acts[type(blk.mlp.act).__name__],
            posemb="rope" if m.pos_embed is None else "learn",
            prefix_posemb=table_has_prefix or not m.num_prefix_tokens,
            layer_scale_init=1e-5 if layer_scale else None,
            pool=pool,
        )
        assert {k: got[k] for k in want} == want, arch
        assert blk.norm1.eps == getattr(m.norm, "eps", blk.norm1.eps) and s.norm_eps == got["norm_eps"], arch
        if eva:
            assert m.rope.temperature == got["rope_temperature"] and m.rope.rotate_half, arch
            assert (m.pos_embed, m.global_pool) == (None, "avg")  # timm's Eva default; we read the CLS token
        else:
            assert (m.attn_pool is not None) == (pool == "map"), arch
        assert s.expect == dict(
            width=m.embed_dim,
            depth=len(m.blocks),
            patch_size=patch,
            ln_pre=want["ln_pre"],
            class_token=want["class_token"],
            num_registers=want["num_registers"],
            qkv_bias=want["qkv_bias"],
            layer_scale=layer_scale,
        ), arch


def test_unknown_model_args_and_architectures_are_refused():
    with pytest.raises(ConfigError, match=r"model_args \['mystery'\]"):
        timm_config.settings({"architecture": "vit_base_patch16_224", "model_args": {"mystery": 1}}, "c")
    refused = [
        ("vit_base_patch16_224", {"qk_norm": True}, "qk_norm=True is not supported"),
        ("vit_base_patch16_224", {"pos_embed": "none"}, "pos_embed='none' is not supported"),
        ("vit_base_patch16_siglip_224", {"global_pool": "token"}, "'token' .* needs a class token"),
        ("vit_base_patch16_dinov3", {"rope_type": "cat"}, "rope_type='cat' is not supported .only 'dinov3'"),
        ("vit_base_patch16_dinov3", {"use_fc_norm": True}, "use_fc_norm=True is not supported"),
        ("vit_base_patch16_dinov3", {"rope_temperature": 10000}, "rope_temperature=10000 is not supported"),
        ("vit_base_patch16_dinov3", {"global_pool": "map"}, r"global_pool='map' .*\(timm Eva\)"),
        ("vit_base_patch16_dinov3", {"reg_tokens": 4}, r"model_args \['reg_tokens'\]"),
    ]
    for arch, args, message in refused:
        with pytest.raises(ConfigError, match=message) as e:
            timm_config.settings({"architecture": arch, "model_args": args}, "c")
        assert "\n" not in str(e.value)
    # the features DINOv2-reg and SigLIP configs carry are read, not refused
    s = timm_config.settings(
        {"architecture": "vit_base_patch16_224", "model_args": {"reg_tokens": 4, "no_embed_class": True}}, "c"
    )
    assert s.expect["num_registers"] == 4
    s = timm_config.settings({"architecture": "some_new_vit", "pretrained_cfg": {"mean": [0.5] * 3}}, "c")
    assert s.heads is None and s.act is None and s.norm_eps is None and s.std is None
    # a DINOv3 with a classifier trained on the patch average keeps the average
    dinov3 = {"architecture": "vit_base_patch16_dinov3", "global_pool": "avg"}
    assert timm_config.settings({**dinov3, "num_classes": 0}, "c").pool == "cls"
    assert timm_config.settings({**dinov3, "num_classes": 1000}, "c").pool == "gap"
    assert timm_config.settings({**dinov3, "global_pool": "token", "num_classes": 1000}, "c").pool == "cls"


def test_recipes_default_to_the_known_teachers(capsys):
    import importlib.util

    assert cli_main(["list"]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 4) for line in listing.splitlines()[1:] if line.strip()}
    for short, t in known.KNOWN.items():
        assert rows[short] == [short, t.hub, str(t.image_size), t.licence, t.what]
    for short, size, licence in (
        ("dinov2reg_b14", "518", "apache-2.0"),
        ("dinov3_l16", "256", "dinov3-license"),
        ("siglip2_so400m14_378", "378", "apache-2.0"),
    ):
        assert rows[short][2:4] == [size, licence]

    def recipe_config(recipe, *arg):
        spec = importlib.util.spec_from_file_location(recipe, f"configs/{recipe}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(*arg)

    defaults = {
        "hd_vitb16_deit_mae": dict(deit="deit_b16", mae="mae_b16"),
        "hd_vitb16_clip_mae": dict(clip="clip_b16", mae="mae_b16"),
        "hd_vitl16_clipl14_mae": dict(clip="clip_l14", mae="mae_l16"),
        "hd3_vitb16_clip_dino_mae": dict(clip="clip_b16", dino="dino_b16", mae="mae_b16"),
        "hd_vitb16_dinov2_siglip2_mae": dict(dinov2="dinov2reg_b14", siglip2="siglip2_b16", mae="mae_b16"),
        "hd_vitb16_agglomerative": dict(dense="dinov2reg_b14", language="siglip2_b16", mae="mae_b16"),
    }
    for recipe, shorts in defaults.items():
        c = recipe_config(recipe)
        assert {name: t.checkpoint for name, t in c.teachers.items()} == {
            name: known.hub_name(short) for name, short in shorts.items()
        }
        names = list(shorts)[:2]
        local = recipe_config(recipe, "teachers/a,teachers/b")
        assert tuple(local.teachers[name].checkpoint for name in names) == ("teachers/a", "teachers/b")
