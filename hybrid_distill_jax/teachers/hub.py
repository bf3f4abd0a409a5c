"""Teachers by name: ``hf-hub:ORG/NAME[@REVISION]`` -> a converted model directory, converted once.

Resolution (:func:`resolve`):

1. Local first. The repo's ``config.json`` and ``model.safetensors`` are looked up in huggingface_hub's
   cache (``try_to_load_from_cache``: ``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``), a branch or tag
   through its ``refs/`` entry. If they are there and their conversion is in our cache, that directory
   is the answer: no network, no conversion. If the hub cache no longer holds the files (pruned after
   conversion), our own ``refs/`` entry names the last conversion of that revision.
2. Otherwise ``hf_hub_download`` fetches both files (honouring ``HF_HUB_OFFLINE``, ``HF_HOME``,
   ``HF_HUB_CACHE``, ``HF_TOKEN``), the weights pinned to the commit the config came from.
3. Both files are checked against the hash they are stored under: huggingface_hub names a blob by the
   hub's ETag, the sha256 of an LFS file (the weights) or the git blob sha1 of a small one (the config).
   A file whose content does not hash to it is removed from the hub cache and the run fails.
4. The weights are converted with timm's ``config.json`` (``teachers.timm_config``) into
   ``$HYBRID_DISTILL_JAX_CACHE/teachers/models--ORG--NAME/<commit>-<sha256[:16]>`` (default
   ``$HF_HOME/hybrid_distill_jax``), the repo, revision, commit and sha256 recorded in its
   ``model.json`` under ``converted_from.hub``. The conversion is written to a temporary directory and
   renamed into place under a file lock, so processes that start together (multi-host) produce one
   complete directory; a loser of the race discards its copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile

from hybrid_distill_jax.errors import CheckpointError, ConfigError
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.teachers import importer, known, timm_config

PREFIX = "hf-hub:"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
CACHE_ENV = "HYBRID_DISTILL_JAX_CACHE"
_NAME = re.compile(r"^hf-hub:([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")
_SHA256, _SHA1 = re.compile(r"^[0-9a-f]{64}$"), re.compile(r"^[0-9a-f]{40}$")
_logger = logging.getLogger("hybrid_distill_jax")


def describe(name: str, field: str = "checkpoint") -> dict:
    """The ``model.json`` of a hub teacher, without downloading or converting anything.

    In order: the conversion already in our cache; the repo's ``config.json`` in huggingface_hub's cache;
    the known teachers' configs (``known.known_config``). A name none of them describes is a
    ConfigError saying which file to fetch.
    """
    repo, revision = parse(name, field)
    converted = _read_ref(repo, revision)
    config_path = None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    if converted is None and try_to_load_from_cache is not None:
        files = _cached_files(repo, revision)
        if files is not None:
            config_path = files[0]
            target = _conversion_of(repo, files)
            converted = target if _complete(target) else None
    if converted is not None:
        return model_io.read_model_json(converted, field)
    if config_path is None and try_to_load_from_cache is not None:
        cached = try_to_load_from_cache(repo, CONFIG, revision=revision or "main")
        config_path = cached if isinstance(cached, str) else None
    if config_path is not None:
        return timm_config.description(timm_config.read_config(config_path), config_path)
    listed = known.known_config(repo)
    if listed is None:
        raise ConfigError(
            f"{field}={name!r}: its architecture is unknown without its {CONFIG}: run `hf download {repo} "
            f"{CONFIG}` (a few KB), or pass a converted directory"
        )
    return timm_config.description(listed, f"{field}={name}")


def is_hub_name(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(name: str, field: str = "checkpoint") -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    m = _NAME.match(name)
    if not m:
        raise ConfigError(f"{field}={name!r}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return m.group(1), m.group(2)


def cache_root() -> str:
    """``$HYBRID_DISTILL_JAX_CACHE``, else ``hybrid_distill_jax`` under huggingface_hub's ``HF_HOME``."""
    try:
        from huggingface_hub.constants import HF_HOME as home
    except ImportError:  # `teachers list` without huggingface_hub: its default, for the message
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(home, "hybrid_distill_jax"))


def _repo_dir(repo: str) -> str:
    return os.path.join(cache_root(), "teachers", "models--" + repo.replace("/", "--"))


def _download_hint(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"run `hf download {repo} {CONFIG} {WEIGHTS}{rev}` where the hub is reachable (same HF_HOME), "
        "or pass a local converted directory instead"
    )


def resolve(name: str, field: str = "checkpoint", log=_logger.info) -> str:
    """The local converted directory of a hub name (see the module docstring); converts at most once."""
    repo, revision = parse(name, field)
    try:
        import huggingface_hub  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"{field}={name!r}: hub names need huggingface_hub and safetensors, dependencies of "
            f"hybrid_distill_jax missing here ({e.name}): pip install huggingface_hub safetensors "
            "(no torch needed)"
        ) from None
    files = _cached_files(repo, revision)
    if files is None:
        remembered = _read_ref(repo, revision)
        if remembered:
            log(f"{name}: using {remembered} (the hub cache no longer holds its files)")
            return remembered
        files = _download(name, repo, revision, field)
    config_path, weights_path, commit = files
    target = _conversion_of(repo, files)
    key = os.path.basename(target)
    if not _complete(target):
        _convert_once(name, repo, revision, commit, config_path, weights_path, target, log)
    else:
        log(f"{name}: cached conversion {target} (commit {commit[:12]})")
    _write_ref(repo, revision, key)
    return target


def _conversion_of(repo: str, files) -> str:
    """Our cache directory for the conversion of (config, weights, commit): ``<commit>-<sha256[:16]>``."""
    _, weights_path, commit = files
    sha256 = os.path.basename(os.path.realpath(weights_path))
    key = f"{commit}-{sha256[:16]}" if _SHA256.match(sha256) else commit
    return os.path.join(_repo_dir(repo), key)


def _complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in ("model.json", "params.msgpack"))


def _cached_files(repo: str, revision: str | None):
    """(config path, weights path, commit) from huggingface_hub's cache, without the network; or None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, CONFIG, revision=revision or "main")
    if not isinstance(config, str):
        return None
    commit = os.path.basename(os.path.dirname(config))
    weights = try_to_load_from_cache(repo, WEIGHTS, revision=commit)
    return (config, weights, commit) if isinstance(weights, str) else None


def _download(name: str, repo: str, revision: str | None, field: str):
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    paths = {}
    pin = revision
    for filename in (CONFIG, WEIGHTS):
        try:
            paths[filename] = hf_hub_download(repo, filename, revision=pin)
        except GatedRepoError:
            raise ConfigError(
                f"{field}={name!r}: {repo} is gated: accept its terms and `hf auth login`"
            ) from None
        except RepositoryNotFoundError:
            raise ConfigError(
                f"{field}={name!r}: no repository {repo} on the hub (or it is private: `hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise ConfigError(f"{field}={name!r}: {repo} has no revision {revision!r}") from None
        except LocalEntryNotFoundError:
            state = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "unreachable"
            raise ConfigError(
                f"{field}={name!r}: {filename} of {repo} is not in the hub cache {constants.HF_HUB_CACHE} "
                f"and the hub is {state}: {_download_hint(repo, revision)}"
            ) from None
        except EntryNotFoundError:
            raise ConfigError(
                f"{field}={name!r}: {repo} has no {filename} (only timm repos with safetensors weights "
                "resolve by name; convert other files with `teachers import --family ... --input FILE`)"
            ) from None
        except OSError as e:  # HTTP errors, disk full, ...
            raise ConfigError(f"{field}={name!r}: cannot fetch {filename} of {repo}: {e}") from None
        pin = os.path.basename(os.path.dirname(paths[filename]))  # the weights of the config's commit
    return paths[CONFIG], paths[WEIGHTS], pin


def _git_blob_sha1(path: str) -> str:
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str, repo: str, filename: str) -> str:
    """Checks a cached hub file against the hash its blob is named by; removes it if they differ."""
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if _SHA256.match(expected):
        actual, kind = _sha256(blob), "sha256"
    elif _SHA1.match(expected):
        actual, kind = _git_blob_sha1(blob), "git sha1"
    else:
        raise CheckpointError(
            f"{path}: cannot verify {filename} of {repo}: the hub cache does not name it by its hash "
            "(a cache without symlinks); convert the file with `teachers import --family timm` instead"
        )
    if actual != expected:
        for p in {path, blob}:
            if os.path.lexists(p):
                os.remove(p)
        raise CheckpointError(
            f"{filename} of {repo} has {kind} {actual[:16]}..., the hub says {expected[:16]}...: removed "
            f"it from the hub cache; {_download_hint(repo, None)}"
        )
    return actual


def _convert_once(name, repo, revision, commit, config_path, weights_path, target, log) -> None:
    from filelock import FileLock

    os.makedirs(os.path.dirname(target), exist_ok=True)
    lock = os.path.join(cache_root(), "teachers", ".locks", os.path.basename(os.path.dirname(target)))
    os.makedirs(lock, exist_ok=True)
    with FileLock(os.path.join(lock, os.path.basename(target) + ".lock")):
        if _complete(target):  # another process converted it while we waited
            log(f"{name}: converted by another process: {target}")
            return
        config_sha1 = verify(config_path, repo, CONFIG)
        sha256 = verify(weights_path, repo, WEIGHTS)
        log(f"{name}: converting commit {commit[:12]} ({WEIGHTS} sha256 {sha256[:16]}...) into {target}")
        tmp = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
        try:
            hub = {
                "repo": repo,
                "revision": revision or "main",
                "commit": commit,
                "sha256": sha256,
                "config_sha1": config_sha1,
            }
            # 'timm' reads the config.json beside the weights, which names the layout (importer)
            _, _, report = importer.import_checkpoint(
                "timm", weights_path, tmp, provenance={"hub": hub}, log=log
            )
            try:
                os.rename(tmp, target)
                log(f"{name}: converted into {target} (family {report['family']})")
            except OSError:  # a process without the lock (another host, no shared locking) won
                if not _complete(target):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)


def _ref_path(repo: str, revision: str | None) -> str:
    return os.path.join(_repo_dir(repo), "refs", revision or "main")


def _write_ref(repo: str, revision: str | None, key: str) -> None:
    """Remembers which conversion ``revision`` resolved to (a cache read by many: write only changes)."""
    path = _ref_path(repo, revision)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read().strip() == key:
                return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(key)
    os.replace(tmp, path)


def _read_ref(repo: str, revision: str | None) -> str | None:
    if revision and _SHA1.match(revision):
        found = [d for d in _listdir(_repo_dir(repo)) if d.split("-")[0] == revision]
        return os.path.join(_repo_dir(repo), sorted(found)[-1]) if found else None
    path = _ref_path(repo, revision)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        target = os.path.join(_repo_dir(repo), f.read().strip())
    return target if _complete(target) else None


def _listdir(path: str) -> list[str]:
    return [d for d in os.listdir(path) if _complete(os.path.join(path, d))] if os.path.isdir(path) else []
