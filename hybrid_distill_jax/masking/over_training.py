"""``over_training``: the student's input is CLS + K kept patches, K falling over training in stages."""

from __future__ import annotations

import dataclasses
import math

from hybrid_distill_jax import checks
from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.masking import base


@dataclasses.dataclass(frozen=True)
class MaskRatioSchedule:
    """Piecewise-constant mask ratio over training: ``ratios[i]`` from fraction ``starts[i]`` of the steps."""

    starts: tuple[float, ...]
    ratios: tuple[float, ...]

    def __post_init__(self):
        if len(self.starts) != len(self.ratios) or not self.starts:
            raise ConfigError(
                "masking.stage_starts and masking.stage_ratios must be non-empty and of equal length"
            )
        if self.starts[0] != 0.0 or list(self.starts) != sorted(self.starts) or self.starts[-1] >= 1.0:
            raise ConfigError(
                f"masking.stage_starts={list(self.starts)}: must start at 0.0, increase, and stay below 1.0"
            )
        base.check_mask_ratios("masking.stage_ratios", self.ratios)

    def stage(self, step: int, total_steps: int) -> int:
        frac = step / max(total_steps, 1)
        return max(i for i, s in enumerate(self.starts) if s <= frac + 1e-12)

    def mask_ratio(self, step: int, total_steps: int) -> float:
        return self.ratios[self.stage(step, total_steps)]


@base.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class OverTrainingPlan(base.KeepPlan):
    """Student input = CLS + K kept patches, K fixed within a stage and falling over training."""

    mode = "over_training"
    defaults = dict(stage_starts=(0.0, 0.3, 0.6), stage_ratios=(0.0, 0.25, 0.5))
    ranges = dict(stage_starts=checks.UNIT, stage_ratios=checks.UNIT)

    schedule: MaskRatioSchedule

    def __post_init__(self):
        ratios = self.schedule.ratios
        base.check_token_multiple(self.num_patches, "masking.stage_ratios", ratios, self.token_multiple)

    @classmethod
    def from_config(cls, mcfg, num_patches: int, depth: int) -> OverTrainingPlan:
        schedule = MaskRatioSchedule(tuple(mcfg.stage_starts), tuple(mcfg.stage_ratios))
        return cls(schedule=schedule, **cls._common(mcfg, num_patches))

    def stage(self, step: int, total_steps: int) -> int:
        return base.keep_count(
            self.num_patches, self.schedule.mask_ratio(step, total_steps), self.token_multiple
        )

    def stage_metrics(self, stage: int) -> dict[str, float]:
        return {"keep": stage}

    def stages(self, total_steps: int) -> tuple[int, ...]:
        firsts = [
            min(math.ceil(start * total_steps - 1e-9), total_steps - 1) for start in self.schedule.starts
        ]
        return tuple(dict.fromkeys(self.stage(max(step, 0), total_steps) for step in firsts))

    def patches_per_block(self, stage: int, depth: int) -> tuple[int, ...]:
        return (stage,) * depth

    def score_layers(self, teacher_depth: int) -> tuple[int, ...]:
        return (teacher_depth,)

    def select(self, rng, scores_by_layer, stage: int) -> base.KeptTokens:
        (scores,) = scores_by_layer.values()
        keep = base.select_tokens(rng, scores, stage, self.selection, self.temperature)
        return base.KeptTokens(input_indices=keep, drop_after=None, sets=((1, keep),))
