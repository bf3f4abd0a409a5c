"""The pieces of the deviceless compile that need no compiler: target names, the kernel plan's HLO
reading, stage lists, FLOP counts, teacher descriptions and validation for another machine's counts."""

import os

import pytest

from hybrid_distill_jax import config_lib, masking
from hybrid_distill_jax.aot import kernels, targets
from hybrid_distill_jax.compile import required_bytes
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.models.vit import forward_flops, make_vit
from hybrid_distill_jax.teachers import hub, known, timm_config

# A hand-written optimized-HLO excerpt in XLA's text format: two cuBLAS GEMMs (bf16, fp8), a cuDNN
# attention call, a fusion whose body must not count as buffers, a collective and a convolution.
_CUBLAS = 'custom_call_target="__cublas$lt$matmul'
HLO = "\n".join(
    [
        "HloModule jit_step, entry_computation_layout={()->()}",
        "",
        "%fused_computation.1 (param_0: f32[64,1024]) -> f32[64,1024,1024] {",
        "  %param_0 = f32[64,1024]{1,0} parameter(0)",
        "  ROOT %big_inside = f32[64,1024,1024]{2,1,0} broadcast(%param_0), dimensions={0,1}",
        "}",
        "",
        "ENTRY %main (p0: bf16[256,768], p1: bf16[768,3072]) -> f32[] {",
        "  %p0 = bf16[256,768]{1,0} parameter(0)",
        "  %p1 = bf16[768,3072]{1,0} parameter(1)",
        "  %p2 = f8e4m3fn[256,768]{1,0} parameter(2)",
        "  %p3 = f8e4m3fn[768,768]{1,0} parameter(3)",
        "  %gemm.1 = (bf16[256,3072]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), "
        + _CUBLAS
        + '", backend_config={}',
        "  %gemm.2 = (bf16[256,768]{1,0}, s8[1048576]{0}) custom-call(%p2, %p3, %s.1, %s.2), "
        + _CUBLAS
        + '$f8"',
        "  %fmha.1 = (bf16[8,12,208,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), "
        'custom_call_target="__cudnn$fmhaSoftmax"',
        "  %conv.1 = (f32[2,14,14,768]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), "
        'custom_call_target="__cudnn$convForward"',
        "  %fusion.1 = f32[64,1024]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.1",
        "  %all-reduce-start.1 = f32[1000000]{0} all-reduce-start(%fusion.1), replica_groups={}",
        "  %all-reduce-done.1 = f32[1000000]{0} all-reduce-done(%all-reduce-start.1)",
        "  ROOT %r = f32[] constant(0)",
        "}",
    ]
)


def test_kernel_plan_reads_gemm_dtypes_attention_collectives_and_buffers():
    plan = kernels.plan(HLO, largest=3)
    assert plan["gemm_calls"] == 2
    assert plan["gemm_calls_by_operand_dtype"] == {"bf16 x bf16": 1, "f8e4m3fn x f8e4m3fn": 1}
    assert plan["gemm_calls_by_kernel"] == {"__cublas$lt$matmul": 1, "__cublas$lt$matmul$f8": 1}
    assert plan["fused_attention_calls"] == {"__cudnn$fmhaSoftmax": 1}
    assert plan["convolution_calls"] == {"__cudnn$convForward": 1}
    assert plan["collectives"] == {"all-reduce": 1}  # a start/done pair is one collective
    names = [b["name"] for b in plan["largest_buffers"]]
    # the all-reduce buffers (4 MB) come first; the fusion body's 256 MiB broadcast is no buffer, nor are
    # the cuBLAS workspaces (s8) that would otherwise lead the list
    assert names[:2] == ["all-reduce-start.1", "all-reduce-done.1"] and "big_inside" not in names
    assert all(b["dtype"] != "s8" for b in plan["largest_buffers"])
    assert plan["largest_buffers"][0] == {
        "name": "all-reduce-start.1",
        "dtype": "f32",
        "shape": [1000000],
        "bytes": 4_000_000,
        "op": "all-reduce-start",
    }
    lines = kernels.describe(plan)
    assert lines[0].startswith("GEMM calls: 2 (by operand dtype: bf16 x bf16: 1, f8e4m3fn x f8e4m3fn: 1")


@pytest.mark.parametrize(
    "accelerator_type, topology",
    [("v4-32", "v4:2x2x4"), ("v5p-8", "v5p:2x2x1"), ("v5litepod-256", "v5e:16x16"), ("v6e-16", "v6e:4x4")],
)
def test_accelerator_types_map_to_their_default_topology(accelerator_type, topology):
    assert targets.tpu_topology_name(accelerator_type) == topology
    assert targets.platform_of(accelerator_type) == "tpu"


def test_target_names_are_checked():
    assert targets.platform_of("v5e:16x16") == "tpu" and targets.platform_of("h200") == "cuda"
    with pytest.raises(ConfigError, match="expected a TPU slice"):
        targets.platform_of("a100")
    with pytest.raises(ConfigError, match="no default topology for 3 TensorCores"):
        targets.tpu_topology_name("v4-3")
    for card in targets.GPU_CARDS:
        assert os.path.isfile(targets.gpu_spec_path(card))


def test_gpu_memory_fraction(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert targets.memory_fraction() == 0.75  # JAX's default
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='1.5'"):
        targets.memory_fraction()


def test_required_bytes_from_the_tpu_compilers_out_of_memory_error():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(95.17G) exceeds available HBM (15.75G)."
    )
    assert required_bytes(message) == int(95.17 * 2**30)
    assert required_bytes("INTERNAL: something else") is None


def test_every_stage_of_a_run_is_listed():
    cfg = config_lib.base_config("distill").masking
    plan = masking.keep_plan(cfg, 196, 12)
    assert plan.stages(1000) == (196, 147, 98)  # the default ratios 0, 0.25, 0.5
    assert plan.stages(1000) == tuple(dict.fromkeys(plan.stage(s, 1000) for s in range(1000)))
    assert plan.stages(2) == (196, 147)  # too short for the last stage's start: stage 2 is never reached
    assert plan.stages(2) == tuple(dict.fromkeys(plan.stage(s, 2) for s in range(2)))
    assert plan.patches_per_block(98, 12) == (98,) * 12
    cfg.mode = "over_depth"
    depth_plan = masking.keep_plan(cfg, 196, 12)
    (stage,) = depth_plan.stages(1000)
    counts = depth_plan.patches_per_block(stage, 12)
    assert counts == (196,) * 4 + (147,) * 3 + (118,) * 3 + (98,) * 2  # drops after blocks 4, 7 and 10


def test_forward_flops_of_vit_b16_match_the_published_count():
    """ViT-B/16 at 224 px: 17.56 GMACs (timm's and the ViT paper's count), i.e. 35.1 GFLOPs."""
    model = make_vit({"variant": "B/16", "num_classes": 1000})
    flops = forward_flops(model, [196] * 12, 224)
    assert abs(flops / 35.13e9 - 1) < 0.01, flops
    assert forward_flops(model, [98] * 12, 224) < 0.55 * flops  # half the tokens, a bit under half the work


def test_listed_hub_teachers_are_described_without_any_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "ours"))
    meta = hub.describe("hf-hub:timm/vit_large_patch14_clip_224.openai")
    arch = meta["arch"]
    assert (arch["width"], arch["depth"], arch["num_heads"], arch["patch_size"]) == (1024, 24, 16, 14)
    assert arch["act"] == "quick_gelu" and arch["norm_eps"] == 1e-5 and arch["ln_pre"]
    assert not arch["patch_bias"] and arch["num_classes"] == 768 and arch["mlp_dim"] == 4096
    mae = hub.describe("hf-hub:timm/vit_base_patch16_224.mae")["arch"]
    assert (mae["width"], mae["num_heads"], mae["num_classes"], mae["act"]) == (768, 12, 0, "gelu")
    with pytest.raises(ConfigError, match="run `hf download timm/some_vit config.json`"):
        hub.describe("hf-hub:timm/some_vit")


def test_table_entries_are_what_their_config_json_says():
    """Each listed teacher's known config gives the architecture timm_config's checked table gives."""
    for teacher in known.KNOWN.values():
        repo = teacher.hub.removeprefix(hub.PREFIX)
        cfg = known.known_config(repo)
        described = timm_config.description(cfg, repo)["arch"]
        settings = timm_config.settings(cfg, repo)
        assert described["width"] == settings.expect["width"] and described["num_heads"] == settings.heads
        assert described["act"] == settings.act and described["norm_eps"] == settings.norm_eps


def test_validation_for_another_machines_device_and_process_counts():
    c = config_lib.base_config("distill")
    c.teachers.deit.checkpoint = "hf-hub:timm/deit_base_patch16_224.fb_in1k"
    c.teachers.mae.checkpoint = "hf-hub:timm/vit_base_patch16_224.mae"
    c.data.data_dir = "/data/on/the/pod/only"
    c.batch_size = 4096
    config_lib.validate(c, num_devices=256, num_processes=64, deviceless=True)
    c.batch_size = 4000
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 256"):
        config_lib.validate(c, num_devices=256, num_processes=64, deviceless=True)
    c.batch_size = 96
    c.mesh.data, c.mesh.fsdp = 1, 32
    with pytest.raises(ConfigError, match="needs 32 devices but 256 are in use"):
        config_lib.validate(c, num_devices=256, num_processes=64, deviceless=True)
