"""Mesh, sharding rules, FSDP/tensor-parallel equivalence, gradient accumulation, cross-topology restore.

Every equivalence runs the trainer's own jitted step (fp32, deterministic top-k masking, no drop-path) on
the same fixed batches and compares losses and updated parameters with a one-device run.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hybrid_distill_jax import workdir_lock
from hybrid_distill_jax.config_lib import validate
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.vit import make_vit
from hybrid_distill_jax.parallel import sharding
from tests.helpers import REPO, tiny_distill_config


def subprocess_env(devices: int) -> dict:
    """Environment of a test subprocess: its own CPU device count, the suite's compilation cache."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=REPO,
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )


BATCH = 32


# ---- shared with tests/integration/test_distributed.py and the subprocesses -----------------------------
def equivalence_config(tmp_path, tfds_dir, mesh, strategy="replicated", accum=1):
    c = tiny_distill_config(str(tmp_path), tfds_dir, steps=4, batch=BATCH)
    c.masking.selection = "topk"  # deterministic: no random stream differs between layouts
    c.masking.stage_ratios = (0.5, 0.5, 0.5)
    c.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=0))
    c.mesh.update(mesh)
    c.sharding.student = strategy
    c.sharding.teachers = strategy
    c.sharding.fsdp_min_size = 0  # split even the tiny test model
    c.grad_accum_steps = accum
    return c


def fixed_batches(n=2, batch=BATCH, size=32):
    rng = np.random.RandomState(0)
    return [
        {
            "image": rng.uniform(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.randint(0, 10, size=(batch,)).astype(np.int32),
        }
        for _ in range(n)
    ]


def process_rows(trainer, global_batch: int) -> slice:
    """The rows of the global batch this process feeds (contiguous for the default device order)."""
    index_map = trainer.program.batch_sharding.addressable_devices_indices_map((global_batch,))
    rows = sorted({i for idx in index_map.values() for i in range(global_batch)[idx[0]]})
    assert rows == list(range(rows[0], rows[-1] + 1)), rows
    return slice(rows[0], rows[-1] + 1)


def run_fixed_steps(trainer, batches, state=None):
    """Runs the trainer's step on each (global, host) batch; each process feeds its own rows."""
    state = trainer._init_state(jax.random.key(trainer.config.seed)) if state is None else state
    stage = trainer.task.stage(0, trainer.total_steps)
    losses = []
    for b in batches:
        rows = process_rows(trainer, len(b["image"]))
        state, metrics = trainer.step_fn(stage)(
            state, trainer.frozen, trainer._device_batch({k: v[rows] for k, v in b.items()})
        )
        losses.append(float(metrics["loss"]))
    return losses, state


def flat(tree) -> dict:
    return {sharding.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def gathered_params(state) -> dict:
    return flat(sharding.to_host(state["params"]))


def assert_same(a: dict, b: dict, atol=1e-5):
    """Equal parameters, except the attention *key* biases: softmax is invariant to them, so their true
    gradient is 0 and what AdamW (which normalises by the gradient's size) does with the float noise
    left in its place differs with the summation order of each layout. Query and value biases count."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = (a[k], b[k]) if not k.endswith("attn/qkv/bias") else (a[k][[0, 2]], b[k][[0, 2]])
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=k)


# ---- mesh shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mesh,expected",
    [
        (dict(data=-1), dict(data=8, fsdp=1, model=1)),
        (dict(data=2, fsdp=-1), dict(data=2, fsdp=4, model=1)),
        (dict(data=-1, fsdp=2, model=2), dict(data=2, fsdp=2, model=2)),
        (dict(data=1, fsdp=8), dict(data=1, fsdp=8, model=1)),
    ],
)
def test_mesh_shapes(mesh, expected):
    assert sharding.resolve_mesh_shape(mesh, 8) == expected


@pytest.mark.parametrize(
    "mesh,message",
    [
        (dict(data=3), "mesh.data=3 x mesh.fsdp=1 x mesh.model=1 needs 3 devices but 8 are in use"),
        (dict(data=-1, fsdp=3), "do not divide the 8 devices"),
        (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
        (dict(data=0), "mesh.data=0: expected a positive int"),
        (dict(data=-1, pipeline=2), "unknown field(s) ['pipeline']"),
    ],
)
def test_bad_mesh_shapes_say_what_to_change(mesh, message):
    with pytest.raises(ConfigError) as err:
        sharding.resolve_mesh_shape(mesh, 8)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def _set(c, **fields):
    with c.unlocked():
        for dotted, value in fields.items():
            *parents, leaf = dotted.split("__")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(mesh__data=4, mesh__fsdp=4), "mesh.data=4 x mesh.fsdp=4 x mesh.model=1 needs 16 devices"),
        (
            dict(mesh__data=2, mesh__fsdp=4, batch_size=12),
            "batch_size=12 is not divisible by the data-parallel size 8",
        ),
        (dict(mesh__data=-1, grad_accum_steps=3), "grad_accum_steps=3; use a multiple of 24"),
        (dict(grad_accum_steps=0), "grad_accum_steps must be an integer in [1, inf)"),
        (dict(sharding__student="zero3"), "sharding.student='zero3'"),
        (dict(sharding__teachers="tp"), "sharding.teachers='tp'"),
        (dict(sharding__rules=("kernel=fsdp,tensor",)), "'tensor' in 'fsdp,tensor' is not a mesh axis"),
        (dict(sharding__rules=("kernel",)), "is not of the form 'REGEX=SPEC'"),
        (dict(student__remat_policy="some"), "student.remat_policy='some'"),
        (dict(mesh__num_devices=16), "mesh.num_devices=16: expected 0 (all devices) or at most the 8"),
    ],
)
def test_bad_scaling_config_is_one_line(tmp_path, tfds_dir, fields, message):
    c = tiny_distill_config(str(tmp_path), tfds_dir, batch=16)
    _set(c, **fields)
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# ---- rules -------------------------------------------------------------------------------------------
def test_leaf_specs_fsdp_tensor_parallel_and_rules():
    mesh = dict(data=2, fsdp=2, model=2)
    spec = lambda name, shape, **kw: sharding.leaf_spec(name, shape, mesh, **kw)  # noqa: E731
    # FSDP splits the largest divisible dimension; small leaves stay replicated.
    assert spec("params/student/block1/mlp/fc1/kernel", (96, 384), strategy="fsdp") == P("fsdp", "model")
    assert spec("params/student/head/kernel", (96, 384), strategy="fsdp") == P(None, "fsdp")
    assert spec("params/student/head/kernel", (96, 384), strategy="fsdp", fsdp_min_size=10**6) == P()
    assert spec("params/student/block1/attn/qkv/kernel", (96, 3, 4, 24), strategy="fsdp") == P(
        "fsdp", None, "model"
    )
    assert spec("opt_state/1/0/mu/student/block1/attn/proj/kernel", (4, 24, 96)) == P("model")
    assert spec("params/student/cls_token", (1, 1, 97), strategy="fsdp") == P()  # nothing divisible
    rules = sharding.parse_rules(["pos_embed=replicated", "heads/feature/kernel=fsdp+model,None"])
    assert spec("params/student/pos_embed", (1, 17, 96), strategy="fsdp", rules=rules) == P()
    assert spec("params/heads/feature/kernel", (96, 384), rules=rules) == P(("fsdp", "model"), None)
    with pytest.raises(ConfigError, match="which must divide it"):
        spec("params/heads/feature/kernel", (6, 384), rules=rules)


def test_remat_policies_give_the_same_gradients():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    arch = dict(variant="pico/8", image_size=32)
    params = make_vit(arch).init(jax.random.key(0), x)["params"]

    def grads(policy):
        model = make_vit(arch, remat_policy=policy)
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, attn_layers=(1,))["attn_logits"][1] ** 2)  # noqa: E731
        return flat(jax.jit(jax.grad(loss))(params))

    reference = grads("none")
    for policy in ("full", "dots_saveable", "nothing_saveable"):
        assert_same(grads(policy), reference, atol=1e-6)


# ---- equivalence of layouts --------------------------------------------------------------------------
LAYOUTS = {
    "one_device": (dict(data=1, num_devices=1), "replicated", 1),
    "data8": (dict(data=8), "replicated", 1),
    "fsdp": (dict(data=2, fsdp=4), "fsdp", 1),
    "fsdp_tp": (dict(data=2, fsdp=2, model=2), "fsdp", 1),
    "accum4": (dict(data=8), "replicated", 4),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tfds_dir):
    from hybrid_distill_jax.train import Trainer

    tmp = tmp_path_factory.mktemp("layouts")
    batches = fixed_batches()
    results = {}
    for name, (mesh, strategy, accum) in LAYOUTS.items():
        trainer = Trainer(equivalence_config(tmp, tfds_dir, mesh, strategy, accum), str(tmp / name))
        losses, state = run_fixed_steps(trainer, batches)
        results[name] = dict(losses=losses, params=gathered_params(state), state=state, trainer=trainer)
    return results


@pytest.mark.parametrize("name", ["data8", "fsdp", "fsdp_tp", "accum4"])
def test_layout_matches_one_device(layouts, name):
    ref, got = layouts["one_device"], layouts[name]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert_same(got["params"], ref["params"])


def test_fsdp_state_and_teachers_are_split(layouts):
    trainer, state = layouts["fsdp"]["trainer"], layouts["fsdp"]["state"]
    assert dict(trainer.mesh.shape) == dict(data=2, fsdp=4, model=1)
    kernel = state["params"]["student"]["block1"]["mlp"]["fc1"]["kernel"]  # [32, 64]
    assert kernel.sharding.spec == P(None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (32, 16)
    mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
    mu = [s.mu for s in mu if hasattr(s, "mu")][0]
    assert mu["student"]["block1"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp")
    teacher_kernel = trainer.frozen["deit"]["block1"]["mlp"]["fc1"]["kernel"]
    assert teacher_kernel.sharding.spec == P(None, "fsdp")
    tp = layouts["fsdp_tp"]["state"]["params"]["student"]["block1"]["mlp"]["fc1"]["kernel"]
    assert tp.sharding.spec == P("fsdp", "model")


# ---- checkpoints across topologies -------------------------------------------------------------------
RESTORE_ON_ONE_DEVICE = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_threefry_partitionable", True)
from hybrid_distill_jax.train import Trainer
from tests.integration.test_sharding import equivalence_config, fixed_batches, gathered_params
from tests.integration.test_sharding import run_fixed_steps
tmp, tfds_dir, workdir, out = sys.argv[1:5]
assert jax.device_count() == 1
trainer = Trainer(equivalence_config(tmp, tfds_dir, dict(data=-1), "replicated"), workdir)
state, start = trainer.initial_state()
np.savez(out + "_restored.npz", **gathered_params(state))
losses, state = run_fixed_steps(trainer, fixed_batches()[1:], state)
trainer._save(2, state)
trainer.checkpointer.close()
np.savez(out + "_stepped.npz", **gathered_params(state))
print(json.dumps({"start": start, "step": int(state["step"]), "losses": losses}))
"""


def test_checkpoint_from_8_devices_restores_on_1_and_back(tmp_path, tfds_dir, layouts):
    from hybrid_distill_jax.train import Trainer

    workdir = str(tmp_path / "run")
    cfg = lambda: equivalence_config(tmp_path, tfds_dir, dict(data=2, fsdp=4), "fsdp")  # noqa: E731
    trainer = Trainer(cfg(), workdir)
    losses, state = run_fixed_steps(trainer, fixed_batches()[:1])
    trainer._save(1, state)
    trainer.checkpointer.close()
    workdir_lock.release(workdir)  # the trainer never ran: give the workdir to the process below
    saved = gathered_params(state)

    env = subprocess_env(1)
    out = str(tmp_path / "one")
    proc = subprocess.run(
        [sys.executable, "-c", RESTORE_ON_ONE_DEVICE, str(tmp_path), tfds_dir, workdir, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["start"] == 1 and report["step"] == 2
    assert_same(dict(np.load(out + "_restored.npz")), saved, atol=0)
    # The one-device continuation equals the 8-device runs' second step.
    np.testing.assert_allclose(report["losses"], layouts["one_device"]["losses"][1:], rtol=1e-5)

    # ... and the 1-device checkpoint restores onto 8 devices, split again over fsdp.
    back = Trainer(cfg(), workdir)
    state, start = back.initial_state()
    assert start == 2
    assert state["params"]["student"]["block1"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp")
    assert_same(gathered_params(state), dict(np.load(out + "_stepped.npz")), atol=0)
    assert_same(gathered_params(state), layouts["fsdp"]["params"])
    back.checkpointer.close()


# ---- equivalence with today's teachers and a student with registers and LayerScale ------------------
MODERN_LAYOUTS = {name: LAYOUTS[name] for name in ("one_device", "fsdp", "fsdp_tp")}
# Patches scored by DINOv2's CLS attention (past its registers), or by SigLIP's MAP query.
MODERN_SCORES = {"cls": ("dinov2", "cls_attention"), "map": ("siglip", "map_attention")}
GAMMA_RULE = "/ls[12]/gamma$=replicated"


@pytest.fixture(scope="module")
def modern_teachers(tmp_path_factory):
    from tests.helpers import make_teacher
    from tests.integration.test_modern_teachers import DINOV2, DINOV3, SIGLIP

    root = tmp_path_factory.mktemp("modern_teachers")
    return dict(
        dinov2=make_teacher(root / "dinov2", seed=1, perturb_seed=11, **DINOV2),
        dinov3=make_teacher(root / "dinov3", seed=2, perturb_seed=12, **DINOV3),
        siglip=make_teacher(root / "siglip", seed=3, perturb_seed=13, **SIGLIP),
    )


def modern_equivalence_config(tmp_path, tfds_dir, teachers, mesh, strategy="replicated", score="cls"):
    """``equivalence_config`` with the ``tests/tiny_config.py:modern`` teachers and terms, a student
    with 2 registers and LayerScale, and LayerScale's gammas kept whole by a rule."""
    import ml_collections

    from hybrid_distill_jax.teachers import teacher_config
    from hybrid_distill_jax.terms import term_config

    c = equivalence_config(tmp_path, tfds_dir, mesh, strategy)
    c.teachers = ml_collections.ConfigDict(
        {
            name: teacher_config(path, dtype="float32", interpolate_grid=name == "dinov2")
            for name, path in teachers.items()
        }
    )
    c.terms = ml_collections.ConfigDict(
        dict(
            feature=term_config("tokens", "dinov2"),
            relation=term_config("relations", "dinov3"),
            summary=term_config("embedding", "siglip"),
            siglip_tokens=term_config("tokens", "siglip"),
        )
    )
    c.masking.score_teacher, c.masking.score = MODERN_SCORES[score]
    c.student.num_registers = 2
    c.student.layer_scale_init = 0.1
    c.sharding.rules = (GAMMA_RULE,)
    return c


@pytest.fixture(scope="module")
def modern_layouts(tmp_path_factory, tfds_dir, modern_teachers):
    from hybrid_distill_jax.train import Trainer

    tmp = tmp_path_factory.mktemp("modern_layouts")
    batches = fixed_batches()
    results = {}
    for score in MODERN_SCORES:
        for name, (mesh, strategy, _) in MODERN_LAYOUTS.items():
            config = modern_equivalence_config(tmp, tfds_dir, modern_teachers, mesh, strategy, score)
            trainer = Trainer(config, str(tmp / f"{score}_{name}"))
            losses, state = run_fixed_steps(trainer, batches)
            results[score, name] = dict(
                losses=losses, params=gathered_params(state), state=state, trainer=trainer
            )
    return results


def _max_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if not k.endswith("attn/qkv/bias"))


@pytest.mark.parametrize("score", sorted(MODERN_SCORES))
@pytest.mark.parametrize("name", ["fsdp", "fsdp_tp"])
def test_modern_teachers_layout_matches_one_device(modern_layouts, score, name):
    ref, got = modern_layouts[score, "one_device"], modern_layouts[score, name]
    assert {"student/reg_token", "student/block2/ls2/gamma"} <= set(got["params"])
    assert not np.allclose(ref["params"]["student/block2/ls2/gamma"], 0.1)  # trained from its init
    print(
        f"\n[{score} scores, {name}] losses {got['losses']} vs {ref['losses']}; max |param diff| "
        f"{_max_difference(got['params'], ref['params']):.2e}"
    )
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert_same(got["params"], ref["params"])


def test_modern_fsdp_splits_new_parameters_by_the_rules(modern_layouts):
    trainer, state = modern_layouts["cls", "fsdp"]["trainer"], modern_layouts["cls", "fsdp"]["state"]
    student, frozen = state["params"]["student"], trainer.frozen
    expected = {
        "student reg_token [1, 2, 32]": (student["reg_token"], P(None, None, "fsdp")),
        "student gamma [32], by rule": (student["block1"]["ls1"]["gamma"], P()),
        "dinov2 reg_token [1, 4, 32]": (frozen["dinov2"]["reg_token"], P(None, None, "fsdp")),
        "dinov2 gamma [32], by rule": (frozen["dinov2"]["block2"]["ls2"]["gamma"], P()),
        "dinov3 qkv kernel [32, 3, 2, 16]": (frozen["dinov3"]["block1"]["attn"]["qkv"]["kernel"], P("fsdp")),
        "siglip map latent [1, 1, 32]": (frozen["siglip"]["map_head"]["latent"], P(None, None, "fsdp")),
        "siglip map kv kernel [32, 64]": (frozen["siglip"]["map_head"]["kv"]["kernel"], P(None, "fsdp")),
    }
    for what, (array, spec) in expected.items():
        assert array.sharding.spec == spec, what
    assert frozen["siglip"]["map_head"]["kv"]["kernel"].addressable_shards[0].data.shape == (32, 16)
    assert "cls_token" not in frozen["siglip"] and "pos_embed" not in frozen["dinov3"]
    # Every leaf, new or old, where the rules put it.
    mesh = dict(trainer.mesh.shape)
    rules = sharding.parse_rules([GAMMA_RULE])
    trees = {"params": state["params"], "opt_state": state["opt_state"], "teachers": frozen}
    for prefix, tree in trees.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = f"{prefix}/{sharding.path_name(path)}"
            assert leaf.sharding.spec == sharding.leaf_spec(name, leaf.shape, mesh, "fsdp", rules), name
    # With tensor parallelism the MAP head's MLP and DINOv3's heads are split over 'model' too.
    tp = modern_layouts["cls", "fsdp_tp"]["trainer"].frozen
    assert tp["siglip"]["map_head"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "model")
    assert tp["dinov3"]["block1"]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", None, "model")
