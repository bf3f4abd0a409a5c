"""Reading (and writing) PyTorch checkpoints safely, as flat dicts of numpy arrays.

What runs for each kind of file:

* ``.safetensors``: ``safetensors.numpy.load_file`` (no torch, no pickle at all).
* a ``torch.save`` file (``.pth``/``.pt``/``.bin``, zip or legacy format): ``torch.load(path,
  weights_only=True, map_location="cpu")``, torch's restricted unpickler that builds tensors and plain
  containers only. Without torch installed, zip-format files are read by :func:`read_torch_zip` below.
* a TorchScript archive (OpenAI CLIP's ``ViT-B-16.pt``): never ``torch.jit.load``, which would rebuild
  the archive's TorchScript code and hand back a callable program. :func:`read_torch_zip` opens it as a
  zip and unpickles ``data.pkl`` with an unpickler that resolves no global to real code: the tensor
  rebuild functions are our own numpy versions, storages are read from ``data/<key>`` records, and
  every other class named in the pickle (``__torch__.*`` modules, ``argparse.Namespace``, ...) becomes
  an inert stub that only records its arguments and state. The ``code/`` records are never read.

Only local files are read here: a URL or hub name fails at once, naming what to do (``hf-hub:`` names
are resolved by ``teachers.hub`` before a file reaches this module).
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import re
import sys
import zipfile
from typing import Any

import numpy as np

from hybrid_distill_jax.errors import CheckpointError, ConfigError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": "bfloat16",
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_REMOTE = re.compile(r"^(https?|s3|gs|hf|hf-hub|ftp)://|^hf-hub:|^timm/", re.IGNORECASE)

_TV_LIBRARY = None


def declare_torchvision_ops() -> None:
    """PyPI's torchvision wheel is a CUDA build whose C ops do not load beside a CPU-only torch, and its
    import then fails on 'operator torchvision::nms does not exist'. Declaring the two op schemas first
    lets it import (timm and open_clip only need its Python parts)."""
    global _TV_LIBRARY
    import torch

    if "torchvision" in sys.modules or _TV_LIBRARY is not None:
        return
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return
    if torch.version.cuda is None and "+cpu" not in version:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_LIBRARY = lib  # keep alive: the registration ends with the object
        except RuntimeError:
            pass


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes  # shipped with jax

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_local(path: str, what: str = "--input") -> str:
    """Refuses URLs and hub names (no download happens here) and paths that do not exist."""
    hub_like = (
        not os.path.exists(path)
        and re.match(r"^[\w-][\w.-]*/[\w.-]+$", path)
        and not path.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))
    )
    if _REMOTE.match(path) and "://" in path:
        name = path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        raise ConfigError(
            f"{what}={path!r} is a URL: this tool never downloads. Fetch {name!r} yourself "
            f"(e.g. curl -LO {path}) and pass the local file"
        )
    if _REMOTE.match(path) or hub_like:
        repo = re.sub(r"^(hf-hub:|hf://)", "", path)
        raise ConfigError(
            f"{what}={path!r} looks like a hub name, not a local file: write it as hf-hub:{repo} "
            "(a timm repo with model.safetensors + config.json; resolved by teachers.hub), or fetch "
            "the weights file yourself and pass its local path"
        )
    if not os.path.exists(path):
        raise ConfigError(f"{what}={path!r}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{what}={path!r} is a directory; pass the checkpoint file itself")
    return path


# --------------------------------------------------------------------------------------------------
# A restricted, code-free reader for torch zip archives (torch.save >= 1.6 and TorchScript).


class _Stub:
    """Stands in for any class named in a pickle: records constructor args and state, runs nothing."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    def __repr__(self):
        return f"<stub {self._qualname}>"


class _OrderedDict(dict):
    """collections.OrderedDict as pickled by torch (a state dict carries ``_metadata`` state)."""

    def __setstate__(self, state):
        self._pickled_state = state


class _Storage:
    def __init__(self, dtype, key):
        self.dtype, self.key = dtype, key


class _TorchZipUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._stubs: dict[str, type] = {}
        self._cache: dict[str, np.ndarray] = {}
        self.stubbed: set[str] = set()

    def _storage_array(self, storage: _Storage, dtype=None) -> np.ndarray:
        dtype = dtype or storage.dtype
        if dtype is None:
            raise CheckpointError("an untyped storage is used without a dtype in the torch archive")
        if (storage.key, dtype) not in self._cache:
            raw = self._archive.read(f"{self._prefix}/data/{storage.key}")
            np_dtype = _np_dtype(dtype).newbyteorder("<" if self._byteorder == "little" else ">")
            self._cache[(storage.key, dtype)] = np.frombuffer(raw, dtype=np_dtype)
        return self._cache[(storage.key, dtype)]

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, *_unused):
        return self._rebuild_tensor(storage, offset, size, stride, dtype=_TORCH_DTYPES.get(dtype, dtype))

    def _rebuild_tensor(self, storage, offset, size, stride, *_unused, dtype=None):
        flat = self._storage_array(storage, dtype)
        if not size:
            return np.array(flat[offset])
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
        )
        return np.ascontiguousarray(view).astype(view.dtype.newbyteorder("="))

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return self._rebuild_tensor_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "torch._utils" and name == "_rebuild_parameter_with_state":
            return lambda data, *_: data
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return name
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # a marker; persistent_load turns it into a dtype
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return _OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict}[name]
        qualname = f"{module}.{name}"
        if qualname not in self._stubs:
            self._stubs[qualname] = type(name, (_Stub,), {"_qualname": qualname})
            self.stubbed.add(qualname)
        return self._stubs[qualname]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent record {pid!r} in the torch archive")
        _, storage_type, key, _location, _numel = pid[:5]
        if storage_type == "UntypedStorage":
            dtype = None  # typed by _rebuild_tensor_v3
        elif isinstance(storage_type, str) and storage_type in _STORAGE_DTYPES:
            dtype = _STORAGE_DTYPES[storage_type]
        elif isinstance(storage_type, str) and storage_type in _TORCH_DTYPES:  # UntypedStorage + dtype
            dtype = _TORCH_DTYPES[storage_type]
        else:
            raise CheckpointError(f"unsupported storage type {storage_type!r} in the torch archive")
        return _Storage(dtype, str(key))


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(re.match(r"^[^/]+/(code/|constants\.pkl$)", n) for n in z.namelist())


def _flatten_stubs(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
    """Walks a TorchScript module tree (stubs whose state is a dict of attributes) into dotted keys."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
    elif isinstance(obj, _Stub):
        state = getattr(obj, "_state", None)
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str):
                    _flatten_stubs(v, f"{prefix}{k}.", out, seen)


def read_torch_zip(path: str) -> Any:
    """Unpickles a torch zip archive's ``data.pkl`` without running any code from it.

    Returns the unpickled object (tensors as numpy arrays); for TorchScript archives, the flat
    ``{dotted.name: array}`` of every tensor attribute in the module tree (parameters and buffers).
    """
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if re.match(r"^[^/]+/data\.pkl$", n)]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch zip archive (no single <name>/data.pkl record)")
        prefix = pkl[0].split("/")[0]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = z.read(f"{prefix}/byteorder").decode().strip() or "little"
        with z.open(pkl[0]) as f:
            unpickler = _TorchZipUnpickler(f, z, prefix, byteorder)
            try:
                obj = unpickler.load()
            except CheckpointError:
                raise
            except Exception as e:  # a damaged or unexpected pickle
                raise CheckpointError(f"{path}: cannot read {pkl[0]} ({type(e).__name__}: {e})") from None
        torchscript = any(n.startswith(f"{prefix}/code/") for n in names)
    if torchscript or isinstance(obj, _Stub):
        flat: dict[str, np.ndarray] = {}
        _flatten_stubs(obj, "", flat, set())
        return flat
    return obj


# --------------------------------------------------------------------------------------------------


def _to_numpy(obj: Any) -> Any:
    """torch tensors (any dtype) -> numpy, recursively through dicts/lists."""
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16 of its own
            t = t.float()
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def load_raw(path: str, log=print) -> Any:
    """Reads a local checkpoint file into numpy arrays (nested as saved). See the module docstring."""
    check_local(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ConfigError(
                "reading .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if is_torchscript(path):
        log(f"{path}: TorchScript archive; reading its tensors only (no code from it is loaded or run)")
        return read_torch_zip(path)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        if zipfile.is_zipfile(path):
            return read_torch_zip(path)
        raise ConfigError(
            f"{path}: a legacy (pre-1.6) torch file needs torch to read: bash scripts/install_torch_cpu.sh"
        )
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}"
            ) from None
        # weights_only rejects non-tensor globals such as argparse.Namespace in training checkpoints; our
        # reader turns those into inert stubs instead, still without running any code.
        log(
            f"{path}: torch.load(weights_only=True) refused a non-tensor object "
            f"({str(e).splitlines()[0][:120]}); reading the tensors with the code-free reader instead"
        )
        return read_torch_zip(path)
    except (RuntimeError, EOFError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # EOFError of an empty file: no text
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({reason})") from None
    return _to_numpy(obj)


# --------------------------------------------------------------------------------------------------
# State-dict extraction.

_CONTAINER_KEYS = ("model", "state_dict", "module", "teacher", "model_ema", "state_dict_ema")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray)


def extract_state_dict(obj: Any, path: str, log=print) -> dict[str, np.ndarray]:
    """Finds the state dict inside a checkpoint ({"model": sd}, {"state_dict": sd}, DINO's {"teacher": sd})
    and strips a DistributedDataParallel ``module.`` prefix. Returns {key: float32 array}."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    if not any(_is_array(v) for v in obj.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                others = sorted(str(k) for k in obj if k != key)
                log(f"using checkpoint[{key!r}]" + (f" (ignoring {', '.join(others)})" if others else ""))
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                f"{path}: no tensors at the top level and none of {list(_CONTAINER_KEYS)} holds a state dict "
                f"(top-level keys: {sorted(map(str, obj))[:20]})"
            )
    sd, skipped = {}, []
    for k, v in obj.items():
        if _is_array(v) and (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"):
            sd[str(k)] = np.asarray(v, np.float32)
        else:
            skipped.append(str(k))
    if skipped:
        log(
            f"skipping {len(skipped)} non-float entr{'y' if len(skipped) == 1 else 'ies'}: "
            f"{', '.join(skipped[:10])}"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{path}: the state dict holds no floating-point tensors")
    return sd


def load_state_dict(path: str, log=print) -> dict[str, np.ndarray]:
    return extract_state_dict(load_raw(path, log), path, log)


def save_state_dict(sd: dict[str, np.ndarray], path: str) -> str:
    """Writes a flat state dict as .safetensors (numpy API, no torch needed) or .pth (torch.save)."""
    sd = {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ConfigError(
                "writing .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        save_file(sd, path)
    elif path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"writing {path} needs torch (bash scripts/install_torch_cpu.sh); "
                "or write .safetensors, which needs no torch"
            ) from None
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    else:
        raise ConfigError(f"--output={path!r}: use a .safetensors or .pth file name")
    return path
