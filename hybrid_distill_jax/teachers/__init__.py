"""The teachers' wing: the whole life of a teacher, from a name to the frozen module the step runs.

- ``resolve``: a checkpoint reference (directory or ``hf-hub:ORG/NAME[@REVISION]``) -> a directory,
  its description (never downloading), or the loaded model.
- ``hub``: the hub cache, download, hash verification and convert-once.
- ``known``: the known teachers by short name (``hub_name('mae_b16')``).
- ``frozen``: ``teacher_config`` (a ``config.teachers`` entry), its checks, and ``FrozenTeacher``.
- ``importer`` + ``families`` (one module per checkpoint family) + ``torch_io`` + ``timm_config``:
  PyTorch checkpoints <-> our model directories. ``python -m hybrid_distill_jax.teachers
  {import,export,list}`` is their command line (docs/CONVERT.md).

The rest of the package imports this face only; ``models`` reads and writes directories and knows
nothing of names.
"""

from hybrid_distill_jax.teachers.frozen import FrozenTeacher, check_teacher_entry, teacher_config
from hybrid_distill_jax.teachers.known import hub_name
from hybrid_distill_jax.teachers.resolve import describe, describe_for_validation, load_model, resolve

__all__ = [
    "FrozenTeacher",
    "check_teacher_entry",
    "describe",
    "describe_for_validation",
    "hub_name",
    "load_model",
    "resolve",
    "teacher_config",
]
