"""How a term normalises its teacher's targets before comparing (``target_norm``), and the statistics the
stateful choices keep in the train state.

Stateless, per batch:
- ``'whiten'``: a parameter-free LayerNorm over channels, per token (FD, MaskAlign);
- ``'standardize'``: each channel to zero mean and unit variance over the batch's tokens;
- ``'none'``.

Stateful (``STATEFUL``), the statistics in ``state['stats'][TERM]``, checkpointed with the run:
- ``'phi_s'`` (PHI-S, RADIOv2.5 and later): ``y = R (x - mean) / scale`` with ``R = H U^T``, where U holds the
  eigenvectors of the targets' channel covariance, H is a normalised Hadamard matrix (``hadamard``) and
  ``scale = sqrt(mean eigenvalue)``. Every channel of y then has variance exactly 1: the diagonal of
  ``H diag(e) H^T`` is ``mean(e)`` because every entry of H has the same magnitude. The statistics are
  estimated once, at the start of a fresh run, from the teacher's outputs on the first ``phi_s_batches``
  training batches (the teacher is frozen, so they never change) and are restored, not re-estimated,
  on resume. ``x = scale * R^T y + mean`` maps the student's predictions back to the teacher's space.
- ``'ema'`` (UNIC, DUNE): each channel's mean and mean square followed by an EMA whose momentum anneals
  from 1 (the first batch's statistics) to ``ema_momentum`` over ``ema_anneal_steps`` steps (cosine).
  A step standardises with the statistics updated by its own batch. Means of squares rather than
  variances are kept so that gradient-accumulation micro-batches average to the full batch's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax import checks, losses

TARGET_NORMS = ("whiten", "standardize", "phi_s", "ema", "none")
STATEFUL = ("phi_s", "ema")
# The fields a normalising term owns beside ``target_norm`` (whose default is the kind's).
FIELDS = dict(phi_s_batches=8, ema_momentum=0.001, ema_anneal_steps=1000)
RANGES = dict(
    phi_s_batches=checks.ints(1),
    ema_momentum=checks.Range(0.0, 1.0, open_lo=True, open_hi=False),
    ema_anneal_steps=checks.ints(1),
)
EPS = 1e-6


# -- Hadamard matrices -------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = the quadratic character of (j - i) mod q, for a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int) -> np.ndarray:
    """Paley's conference matrix of order q + 1: zero diagonal, C C^T = q I."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1 if q % 4 == 1 else -1
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley(order: int) -> np.ndarray | None:
    """A Hadamard matrix of ``order`` by Paley's constructions, or None. I: order q + 1 for a prime
    q = 3 (mod 4), H = I + C. II: order 2(q + 1) for a prime q = 1 (mod 4), H = C x [[1, 1], [1, -1]] +
    I x [[1, -1], [-1, -1]]."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        return np.eye(order, dtype=np.int64) + _conference(q)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = _conference(q)
        return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
            np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
        )
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order ``n`` (entries +-1, H H^T = n I), or None where we build none.

    Sylvester's construction gives the powers of two; any other width is a Paley order times a power of
    two (a Kronecker product): 384 = 12 x 32 and 768 = 12 x 64 (Paley I, q = 11), 1152 = 36 x 32
    (Paley II, q = 17), 1280 = 20 x 64 (Paley I, q = 19). Hadamard matrices exist only for 1, 2 and
    multiples of 4; a width of neither form (e.g. 6, 100 or 92) has none here, and PHI-S refuses it.
    """
    if n >= 1 and n & (n - 1) == 0:
        return _sylvester(n)
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    while power >= 1:
        base = _paley(n // power)
        if base is not None:
            return np.kron(base, _sylvester(power))
        power //= 2
    return None


# -- statistics --------------------------------------------------------------------------------------
def init_stats(kind: str, width: int) -> dict | None:
    """The statistics ``kind`` keeps for targets of ``width`` channels before any data: an identity
    transform (PHI-S, until estimated) or zero mean and unit mean square (EMA); None when stateless."""
    if kind == "phi_s":
        return dict(
            mean=jnp.zeros((width,), jnp.float32),
            rotation=jnp.eye(width, dtype=jnp.float32),
            scale=jnp.ones((), jnp.float32),
        )
    if kind == "ema":
        return dict(mean=jnp.zeros((width,), jnp.float32), sq_mean=jnp.ones((width,), jnp.float32))
    return None


def batch_moments(x: jax.Array) -> dict:
    """Each channel's mean and mean square over every other axis, fp32."""
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    return dict(mean=jnp.mean(x, axis=0), sq_mean=jnp.mean(x * x, axis=0))


def ema_momentum(step: jax.Array, end: float, anneal_steps: int) -> jax.Array:
    """The EMA's weight on the current batch at ``step`` (0-based): 1 at step 0, annealed to ``end`` by
    a half cosine over ``anneal_steps`` steps, then held."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32) / anneal_steps, 1.0)
    return end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def ema_update(stats: Mapping, moments: Mapping, momentum: jax.Array) -> dict:
    return {k: momentum * moments[k] + (1.0 - momentum) * stats[k] for k in ("mean", "sq_mean")}


def centred_moments(x: jax.Array) -> dict:
    """One batch's sufficient statistics for PHI-S: token count, channel means and the centred scatter
    matrix sum((x - mean)(x - mean)^T), fp32 on the devices (combined in float64 by ``phi_s_stats``)."""
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    mean = jnp.mean(x, axis=0)
    d = x - mean
    scatter = jnp.einsum("nc,nd->cd", d, d, precision=jax.lax.Precision.HIGHEST)
    return dict(count=jnp.float32(x.shape[0]), mean=mean, scatter=scatter)


def phi_s_stats(batches: list[Mapping]) -> dict:
    """PHI-S's mean, rotation and scale from per-batch ``centred_moments`` (combined exactly, in float64,
    by the parallel-variance formula)."""
    n, mean, scatter = 0.0, None, None
    for b in batches:
        nb, mb, sb = (
            float(b["count"]),
            np.asarray(b["mean"], np.float64),
            np.asarray(b["scatter"], np.float64),
        )
        if mean is None:
            n, mean, scatter = nb, mb, sb
            continue
        delta = mb - mean
        total = n + nb
        scatter = scatter + sb + np.outer(delta, delta) * (n * nb / total)
        mean = mean + delta * (nb / total)
        n = total
    cov = scatter / max(n - 1.0, 1.0)
    eigenvalues, vectors = np.linalg.eigh(cov)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    width = cov.shape[0]
    h = hadamard(width) / math.sqrt(width)
    return dict(
        mean=mean.astype(np.float32),
        rotation=(h @ vectors.T).astype(np.float32),
        scale=np.float32(max(math.sqrt(float(np.mean(eigenvalues))), 1e-12)),
    )


# -- the transform -----------------------------------------------------------------------------------
def normalize(x: jax.Array, kind: str, stats: Mapping | None = None) -> jax.Array:
    """``x`` [..., C] normalised by ``kind``, fp32. The stateful kinds read ``stats``: PHI-S's
    (mean, rotation, scale), or the EMA's (mean, sq_mean) already updated with this batch."""
    if kind == "whiten":
        return losses.whiten(x)
    if kind == "standardize":
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.var(x, axis=axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + EPS)
    if kind == "phi_s":
        centred = x.astype(jnp.float32) - stats["mean"]
        rotated = jnp.einsum("...c,dc->...d", centred, stats["rotation"], precision=jax.lax.Precision.HIGHEST)
        return rotated / stats["scale"]
    if kind == "ema":
        var = jnp.maximum(stats["sq_mean"] - stats["mean"] ** 2, 0.0)
        return (x.astype(jnp.float32) - stats["mean"]) * jax.lax.rsqrt(var + EPS)
    return x


# -- the terms that normalise targets ----------------------------------------------------------------
class NormalizedTargets:
    """Mixin of the ``Term`` kinds whose fields include ``target_norm`` (and ``FIELDS``): their targets,
    the statistics they keep in the train state and how those are estimated and exported.

    A kind supplies ``raw_target(teacher_out, patches)`` (the teacher's values before normalisation; at
    the patch indices ``patches``, or every patch when None), ``kept_patches(inputs)`` (the patches a
    step compares at) and ``target_width``.
    """

    target_width: int

    def raw_target(self, teacher_out: dict, patches: jax.Array | None) -> jax.Array:
        raise NotImplementedError

    def kept_patches(self, inputs) -> jax.Array | None:
        raise NotImplementedError

    @property
    def norm(self) -> str:
        return self.cfg.target_norm

    @property
    def keeps_stats(self) -> bool:
        return self.norm in STATEFUL

    def init_stats(self) -> dict | None:
        return init_stats(self.norm, self.target_width)

    def stats_now(self, raw: jax.Array, stats: Mapping | None, step: jax.Array | None) -> Mapping | None:
        """The statistics this step normalises with: the EMA's moved by this batch; PHI-S's as stored."""
        if self.norm != "ema":
            return stats
        momentum = ema_momentum(step, self.cfg.ema_momentum, self.cfg.ema_anneal_steps)
        return ema_update(stats, batch_moments(raw), momentum)

    def target(self, inputs) -> jax.Array:
        """The normalised target at the kept patches, fp32 unless 'none'."""
        raw = self.raw_target(inputs.teacher, self.kept_patches(inputs))
        return normalize(raw, self.norm, self.stats_now(raw, inputs.stats, inputs.step))

    # -- the train state's statistics ---------------------------------------------------------------
    def batch_stats(self, inputs) -> dict | None:
        """This batch's moments for the EMA's update after the step (None: nothing to update)."""
        if self.norm != "ema":
            return None
        return batch_moments(self.raw_target(inputs.teacher, self.kept_patches(inputs)))

    def updated_stats(self, stats: Mapping, moments: Mapping, step: jax.Array) -> Mapping:
        """The statistics after step ``step``: the EMA moved by the whole batch's ``moments``."""
        momentum = ema_momentum(step, self.cfg.ema_momentum, self.cfg.ema_anneal_steps)
        return ema_update(stats, moments, momentum)

    @property
    def estimation_batches(self) -> int:
        """How many training batches the statistics are estimated from before the first step (0: none)."""
        return int(self.cfg.phi_s_batches) if self.norm == "phi_s" else 0

    def estimation_moments(self, teacher_out: dict) -> dict:
        """One batch's ``centred_moments`` of the targets at every patch."""
        return centred_moments(self.raw_target(teacher_out, None))

    def describe_stats(self) -> dict:
        """What an export says of the statistics it writes (``target_stats.npz``)."""
        inverse = {
            "phi_s": "teacher = scale * target @ rotation + mean",
            "ema": "teacher = target * sqrt(maximum(sq_mean - mean**2, 0) + 1e-6) + mean",
        }[self.norm]
        return {"teacher": self.cfg.teacher, "target_norm": self.norm, "inverse": inverse}
