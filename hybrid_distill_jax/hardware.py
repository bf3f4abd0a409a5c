"""The hardware a run needs, refused up front in one line when this host lacks it (docs/ERRORS.md).

``JAX_PLATFORMS`` naming an accelerator this host does not have is refused before any backend starts:
JAX would fail there with libtpu's lines on stderr and a traceback (``tpu``), or with a bare
AssertionError (``cuda`` alone). A backend it names that is there but cannot start (no libtpu, a broken
driver, a misspelt name) is refused too. ``attn_impl='cudnn'`` is refused unless the step is built for an
NVIDIA GPU: JAX would fail in the first step (``cuDNN is not detected``).

One place decides: ``config_lib.validate`` calls :func:`platform` (unless given a deviceless compile's
target platform, for which ``compile`` sets JAX up itself) and :func:`check_kernels`; ``main`` calls
:func:`check_platforms` first, before ``jax.distributed.initialize`` (which must precede any backend
start); the analyze command line and ``benchmarks/throughput.py``, which use devices without validating a
config, call :func:`platform`. The teachers command line needs no device.
"""

from __future__ import annotations

from hybrid_distill_jax.errors import ConfigError

ENV = "JAX_PLATFORMS"
# The accelerators a JAX_PLATFORMS entry needs ('gpu' is JAX's alias for either GPU), as this module names
# the platforms it finds.
_NEEDS = {"tpu": ("tpu",), "cuda": ("cuda",), "rocm": ("rocm",), "gpu": ("cuda", "rocm")}
_NAMES = {"tpu": "TPU", "cuda": "NVIDIA GPU", "rocm": "AMD GPU", "gpu": "GPU"}


def present() -> tuple[str, ...]:
    """The platforms this host has: 'cpu', and 'tpu', 'cuda', 'rocm' where TPU chips are on the PCI bus or
    an NVIDIA or AMD GPU's device files exist. Starts nothing."""
    # JAX's own tests (its choice of backends follows them); no public API exposes them.
    from jax._src import hardware_utils

    found = ["cpu"]
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        found.append("tpu")
    if hardware_utils.has_visible_nvidia_gpu():
        found.append("cuda")
    if hardware_utils.num_available_amd_gpus(stop_at=1) > 0:
        found.append("rocm")
    return tuple(found)


def _requested() -> str:
    """JAX_PLATFORMS as JAX read it ('' when unset: JAX picks the best backend that starts)."""
    import jax

    return jax.config.jax_platforms or ""


def _refusal(requested: str, reason: str, here: tuple[str, ...]) -> ConfigError:
    advice = f"the platforms here: {', '.join(here)} (unset {ENV} or name one)"
    return ConfigError(f"{ENV}={requested}: {reason}; {advice}")


def cpu_without_accelerators() -> None:
    """With JAX_PLATFORMS unset on a host with no accelerator, points JAX at the CPU: it would otherwise
    start the CUDA and TPU plugins the accelerator extras install, which print their failures (a cuInit
    traceback, libtpu's warnings) before JAX falls back to the CPU. Starts no backend."""
    if not _requested() and present() == ("cpu",):
        import jax

        jax.config.update("jax_platforms", "cpu")


def check_platforms() -> None:
    """A ConfigError naming JAX_PLATFORMS when it names an accelerator this host lacks and JAX would fail
    on it: a TPU or an AMD GPU, or only absent ones (JAX passes over an absent NVIDIA GPU, so
    ``JAX_PLATFORMS=cuda,cpu`` runs on the CPU); unset, ``cpu_without_accelerators``. Starts no backend."""
    requested = _requested()
    named = [p.strip() for p in requested.split(",") if p.strip()]
    if not named:
        cpu_without_accelerators()
        return
    here = present()
    lacking = [p for p in named if p in _NEEDS and not set(_NEEDS[p]) & set(here)]
    if any(p != "cuda" for p in lacking) or len(lacking) == len(named):
        what = " or ".join(dict.fromkeys(_NAMES[p] for p in lacking))
        raise _refusal(requested, f"this host has no {what}", here)


def platform() -> str:
    """The platform JAX runs on here, its backend started: 'cpu', 'tpu', 'cuda' (an NVIDIA GPU) or 'rocm'.

    A ConfigError naming JAX_PLATFORMS when it names hardware this host lacks (``check_platforms``) or a
    backend that cannot start; a failure of JAX's own choice (JAX_PLATFORMS unset) keeps its traceback.
    """
    check_platforms()
    import jax

    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        requested = _requested()
        if not requested:
            raise
        # "Unable to initialize backend 'tpu': ... (set JAX_PLATFORMS='' to ...)": JAX's first line, less
        # its advice, which the refusal gives
        reason = str(e).strip().splitlines()[0].split(f" (set {ENV}=")[0].rstrip(".")
        raise _refusal(requested, f"JAX cannot start it: {reason}", present()) from None
    if device.platform == "gpu":  # JAX calls both GPUs 'gpu'; its own test for CUDA is the same
        return "cuda" if "cuda" in device.client.platform_version.lower() else "rocm"
    return device.platform


def check_kernels(config, platform: str) -> None:
    """A ConfigError naming the first ``attn_impl`` field (``student``, ``model``, ``teachers.NAME``) that
    asks for cuDNN's fused attention when the step is built for ``platform`` (:func:`platform`'s names),
    not an NVIDIA GPU."""
    if platform == "cuda":
        return
    sections = [(name, config.get(name)) for name in ("student", "model")]
    sections += [(f"teachers.{name}", t) for name, t in (config.get("teachers") or {}).items()]
    for field, section in sections:
        if hasattr(section, "get") and section.get("attn_impl") == "cudnn":
            raise ConfigError(
                f"{field}.attn_impl='cudnn': cuDNN's fused attention needs an NVIDIA GPU, and this run is "
                f"built for {platform}; use '' (the fastest kernel there) or 'xla'"
            )
