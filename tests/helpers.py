"""Shared builders for trainer tests: tiny configs on the embedded data and random-init teacher exports."""

import hashlib
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.vit import make_vit

ARCH = dict(variant="pico/8", drop_path=0.0)


def perturb(params, seed):
    """The same tree with non-trivial weights (peaked attention, no near-ties between patch scores):
    N(0, 1) draws scaled by 2/sqrt(fan_in) for matrices, by 0.1 for vectors."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(paths))
    out = []
    for key, (path, x) in zip(keys, paths):
        r = jax.random.normal(key, x.shape, jnp.float32)
        if x.ndim >= 2:
            fan_in = x.shape[0] if "qkv" in jax.tree_util.keystr(path) else x.size / x.shape[-1]
            out.append(r * 2.0 / np.sqrt(fan_in))
        else:
            out.append(0.1 * r)
    return jax.tree.unflatten(treedef, out)


def make_teacher(directory, seed=0, perturb_seed=None, **arch):
    """An exported ViT initialised from ``seed`` (enough for shapes, losses and gradients), its weights
    replaced by ``perturb(params, perturb_seed)`` when that is given."""
    model = make_vit({**ARCH, "image_size": 32, **arch})
    params = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
    if perturb_seed is not None:
        params = perturb(params, perturb_seed)
    return model_io.save_model(str(directory), model, params)


def set_fields(config, changes: dict, separator: str = "."):
    """Sets each ``changes`` entry, a field path joined by ``separator`` -> its value, in ``config``."""
    for path, value in changes.items():
        *parents, leaf = path.split(separator)
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def tiny_common(c, data_dir, steps=6, batch=16):
    c.image_size = 32
    c.batch_size = batch
    c.total_steps = steps
    c.data.name = "embedded_fashion_mnist"
    c.data.data_dir = data_dir
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.shuffle_buffer = 256
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.log_every = 2
    c.checkpoint_every = 0
    c.tensorboard = False
    c.eval.at_end = False
    return c


def tiny_distill_config(tmp_path, data_dir, steps=6, batch=16):
    feature = os.path.join(tmp_path, "t_feature")
    relation = os.path.join(tmp_path, "t_relation")
    if not os.path.exists(feature):
        make_teacher(feature, seed=1)
        make_teacher(relation, seed=2)
    c = tiny_common(base_config("distill"), data_dir, steps, batch)
    c.student.update(ARCH)
    c.teachers.deit.checkpoint = feature
    c.teachers.mae.checkpoint = relation
    c.teachers.deit.dtype = "float32"
    c.teachers.mae.dtype = "float32"
    return c


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cli(workdir, tfds_dir, teachers, variant: str | None = None) -> list[str]:
    """The command line of a ``tests/tiny_config.py`` distillation: ``teachers`` the two teacher
    directories (deit, mae), or {teacher name: directory}; ``variant`` the config's argument
    (``tests/tiny_config.py:VARIANT``)."""
    if not isinstance(teachers, dict):
        teachers = dict(deit=teachers[0], mae=teachers[1])
    config = os.path.join(REPO, "tests", "tiny_config.py") + (f":{variant}" if variant else "")
    return [
        sys.executable,
        "-m",
        "hybrid_distill_jax.main",
        "--config",
        config,
        f"--workdir={workdir}",
        f"--config.data.data_dir={tfds_dir}",
        *(f"--config.teachers.{name}.checkpoint={path}" for name, path in teachers.items()),
    ]


def tiny_cli_env() -> dict:
    """The environment of a ``tiny_cli`` subprocess: one CPU device, this checkout importable."""
    return dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO
    )


def package_with_one_more_file(tmp_path, relative: str, source: str) -> dict:
    """A copy of the ``hybrid_distill_jax`` package under ``tmp_path`` with exactly one file added at
    ``relative`` (inside the package; it must not exist), and the environment of a subprocess that imports
    that copy instead of this checkout: the proof that an extension needs that one file and no edit
    anywhere else."""
    import filecmp
    import shutil

    package = os.path.join(REPO, "hybrid_distill_jax")
    root = os.path.join(tmp_path, "site")
    copy = os.path.join(root, "hybrid_distill_jax")
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = os.path.join(copy, relative)
    assert not os.path.exists(target), f"{relative} already exists in the package"
    with open(target, "w") as f:
        f.write(source)

    def differences(cmp: filecmp.dircmp) -> list[str]:
        own = [os.path.join(cmp.left, n) for n in cmp.left_only + cmp.right_only + cmp.diff_files]
        return own + [d for sub in cmp.subdirs.values() for d in differences(sub)]

    cmp = filecmp.dircmp(package, copy, ignore=["__pycache__"])
    assert [os.path.relpath(d, package) for d in differences(cmp)] == [relative]
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (a checkout?) first.
    return dict(tiny_cli_env(), PYTHONPATH=os.pathsep.join([root, REPO]), PYTHONSAFEPATH="1")


def prepare_numbered_tfds(data_dir: str, images: np.ndarray, num_shards: int, file_format="tfrecord") -> str:
    """A TFDS dataset prepared in ``data_dir`` whose example ``i`` is ``images[i]`` (uint8 [8, 8, 3], stored
    as PNG) with label ``i % 3``, in ``num_shards`` shard files of ``file_format`` ('tfrecord' or
    'array_record'; TFDS stores the examples in a hashed order). Returns its version directory: the builder
    class is not registered, so the dataset is read from that directory without builder code."""
    import tensorflow_datasets as tfds

    class NumberedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):
                yield i, {"image": image, "label": i % 3}

    builder = NumberedImages(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return str(builder.data_dir)


def timm_parity_error(export_dir: str, out_path: str, image_size: int = 32) -> float:
    """Exports a model directory to a timm state dict through the CLI (``teachers export``), loads it into
    a timm ViT strictly and returns the largest |difference| of the final tokens on random images.
    Needs torch and timm (``scripts/install_torch_cpu.sh``)."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    from hybrid_distill_jax.teachers import importer
    from hybrid_distill_jax.teachers.torch_io import declare_torchvision_ops

    declare_torchvision_ops()
    import timm

    cmd = [sys.executable, "-m", "hybrid_distill_jax.teachers", "export", "--input", export_dir]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([*cmd, "--output", out_path], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, params, _ = model_io.load_model(export_dir)
    _, kwargs, _ = importer.timm_state_dict(model, params)
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    tm.load_state_dict(load_file(out_path), strict=True)
    x = torch.randn((2, 3, image_size, image_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tm.forward_features(x).numpy()
    ours = np.asarray(model.apply({"params": params}, np.asarray(x.permute(0, 2, 3, 1)))["tokens"])
    return float(np.abs(ours - expected).max())


def files_under(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its contents."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def run_cli(cmd) -> subprocess.CompletedProcess:
    """Runs a ``tiny_cli``-style command in a ``tiny_cli_env`` subprocess; asserts it exits 0."""
    proc = subprocess.run(cmd, cwd=REPO, env=tiny_cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_kill_and_resume_match(cli, killed, reference_dir, terms, steps=(3, 8)) -> list[str]:
    """SIGKILLs the run ``cli(killed)`` once it has logged each of ``steps`` (in turn, each attempt resuming
    the last), resumes it to the end, and asserts that its final parameters and its training steps' metric
    rows (``terms`` among them) equal the uninterrupted run's in ``reference_dir``. Returns the stderr of
    each of those runs, the killed ones first."""
    from hybrid_distill_jax.train import metrics
    from tests.integration.test_reliability import _final_params, _run_until

    logs = []
    for step in steps:
        code, err = _run_until(cli(killed), killed, step, signal.SIGKILL)
        assert code == -signal.SIGKILL, err[-3000:]
        logs.append(err)
    logs.append(run_cli(cli(killed)).stderr)
    assert "resumed from" in logs[-1]
    for a, b in zip(_final_params(reference_dir), _final_params(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    keys = ("step", "loss", *terms, "grad_norm")
    rows = lambda d: [{k: r[k] for k in keys} for r in metrics.read_metrics(str(d)) if "loss" in r]  # noqa: E731
    assert rows(reference_dir) == rows(killed)
    return logs


def hub_commit(repo: str) -> str:
    """A stand-in commit hash for ``repo`` (the same on every call)."""
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
