"""Teachers by ``hf-hub:`` name, offline, against a hub cache laid out exactly as huggingface_hub does.

Each of the paper's teacher names gets a random-weight timm model of its real architecture, reduced
through ``model_args`` (depth 2, width 64, 2 heads, 64 px or 56 px for /14) and saved with timm's own
``save_for_hf`` (``model.safetensors`` + the real ``config.json`` shape). The files go into
``models--timm--NAME/{blobs,refs,snapshots}`` under their hub hashes, and everything runs with
``HF_HUB_OFFLINE=1``. Parity is against timm itself loading the same file; the measured maxima and the
two resolution times are printed (``pytest -s``) and recorded in docs/CONVERT.md.
"""

from __future__ import annotations

import hashlib
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
MAE = "hf-hub:timm/vit_base_patch16_224.mae"


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(cache: str, repo: str, files: dict[str, str], commit: str, ref: str = "main") -> str:
    """Writes ``files`` as huggingface_hub lays out a download: blobs named by the hub's ETag (sha256 for
    LFS files such as weights, the git blob sha1 for small text files), ``refs/<ref>`` holding the commit,
    and ``snapshots/<commit>/<file>`` relative symlinks to the blobs."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    for sub in ("blobs", "refs", f"snapshots/{commit}"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name, src in files.items():
        with open(src, "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_sha1(data)
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        link = os.path.join(root, "snapshots", commit, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join("..", "..", "blobs", blob), link)
    with open(os.path.join(root, "refs", ref), "w") as f:
        f.write(commit)
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (timm's save_for_hf directory, the timm model) for every teacher name."""
    base = tmp_path_factory.mktemp("timm_exports")
    out = {}
    for i, (repo, size) in enumerate(NAMES.items()):
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
        add_to_hub_cache(cache, repo, files, _commit(repo))
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
    assert {r.repo_id for r in info.repos} == set(NAMES)
    for r in info.repos:
        (rev,) = r.revisions
        assert rev.commit_hash == _commit(r.repo_id) and "main" in rev.refs
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
    assert record["commit"] == _commit(repo) and record["revision"] == "main"
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
    for repo in NAMES:
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
    assert hub.resolve(f"{MAE}@{_commit(MAE[7:])}", log=lines.append) == first
    shutil.rmtree(os.path.join(hf_constants.HF_HUB_CACHE, "models--timm--vit_base_patch16_224.mae"))
    assert hub.resolve(MAE, log=lines.append) == first
    assert hub.resolve(f"{MAE}@{_commit(MAE[7:])}", log=lines.append) == first


def test_download_path_pins_the_weights_to_the_configs_commit(hub_env, monkeypatch):
    """The hf_hub_download route (taken when the local look-up misses), served offline by the library."""
    monkeypatch.setattr(hub, "_cached_files", lambda repo, revision: None)
    directory = hub.resolve(MAE, log=lambda s: None)
    record = model_io.read_model_json(directory)["converted_from"]["hub"]
    assert record["commit"] == _commit(MAE[7:]) and os.path.basename(directory).startswith(record["commit"])


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
    assert meta["converted_from"]["hub"]["commit"] == _commit(MAE[7:])


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
    assert exported["teachers"]["mae"]["hub"]["commit"] == _commit(MAE[7:])
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
    """teachers.timm_config.ARCHITECTURES against timm's own factories (built on the meta device)."""
    acts = {"GELU": "gelu", "QuickGELU": "quick_gelu"}
    for arch, expected in timm_config.ARCHITECTURES.items():
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False)
        s = timm_config.settings({"architecture": arch}, arch)
        assert s.expect == dict(
            width=m.embed_dim,
            depth=len(m.blocks),
            patch_size=m.patch_embed.patch_size[0],
            ln_pre=not isinstance(m.norm_pre, torch.nn.Identity),
        ), arch
        assert s.heads == m.blocks[0].attn.num_heads, arch
        assert s.norm_eps == m.blocks[0].norm1.eps == m.norm.eps, arch
        assert s.act == acts[type(m.blocks[0].mlp.act).__name__], arch
        assert expected["patch_size"] == m.patch_embed.patch_size[0]


def test_unknown_model_args_and_architectures_are_refused():
    with pytest.raises(ConfigError, match=r"model_args \['mystery'\]"):
        timm_config.settings({"architecture": "vit_base_patch16_224", "model_args": {"mystery": 1}}, "c")
    with pytest.raises(ConfigError, match="reg_tokens=4 is not supported"):
        timm_config.settings({"architecture": "vit_base_patch16_224", "model_args": {"reg_tokens": 4}}, "c")
    s = timm_config.settings({"architecture": "some_new_vit", "pretrained_cfg": {"mean": [0.5] * 3}}, "c")
    assert s.heads is None and s.act is None and s.norm_eps is None and s.std is None


def test_recipes_default_to_the_known_teachers(capsys):
    import importlib.util

    assert cli_main(["list"]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 2) for line in listing.splitlines()[1:] if line.strip()}
    for short, t in known.KNOWN.items():
        assert rows[short] == [short, t.hub, t.what]

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
    }
    for recipe, shorts in defaults.items():
        c = recipe_config(recipe)
        assert {name: t.checkpoint for name, t in c.teachers.items()} == {
            name: known.hub_name(short) for name, short in shorts.items()
        }
        names = list(shorts)[:2]
        local = recipe_config(recipe, "teachers/a,teachers/b")
        assert tuple(local.teachers[name].checkpoint for name in names) == ("teachers/a", "teachers/b")
