"""What every pipeline does with stage settings: compile each stage's section into its
step, check a run's overrides first, and say in the description what a run may override.

Pipelines are built from step-adding functions (``add_preprocess_steps``, ...) over a
``Graph``, so the end-to-end pipeline composes the same steps the single pipelines run
(kfp.local cannot pass artifacts into a nested pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from embedpipe.components import build_components
from embedpipe.config import Settings
from embedpipe.pipelines.cluster import place


def compiled_sections(settings: Settings, stages: tuple[str, ...]) -> dict[str, dict]:
    """Each stage's section as its step receives it (the parity test checks this)."""
    return {stage: settings.section(stage) for stage in stages}


def describe(summary: str, sections: dict[str, dict]) -> str:
    """The pipeline description: the run form shows JSON boxes, so the defaults go here."""
    defaults = "\n".join(
        f"{stage}: {json.dumps(values, sort_keys=True)}" for stage, values in sections.items()
    )
    return (
        f"{summary}\n\nEach stage's run parameter is a JSON object of settings that "
        'override its compiled defaults (e.g. dedup = {"max_distance": 4}); '
        f"the defaults compiled in:\n{defaults}"
    )


@dataclass
class Graph:
    """The pipeline being built: its components, settings, the compiled section of each
    of its stages and each stage's overrides (the run parameter of the same name)."""

    settings: Settings
    sections: dict[str, dict]
    overrides: dict[str, Any]
    parts: SimpleNamespace

    @classmethod
    def of(cls, settings: Settings, stages: tuple[str, ...], overrides: dict[str, Any]) -> Graph:
        parts = build_components(settings.images.data_image, settings.images.gpu_image)
        return cls(settings, compiled_sections(settings, stages), overrides, parts)

    def check(self):
        """The first step: every stage's settings merged with the run's overrides."""
        given = {stage: self.overrides[stage] for stage in self.sections}
        return self.place(self.parts.check_settings(settings=self.sections, **given))

    def place(self, task, *, cache: bool = True):
        """A step without stage settings (partition): object store, retries, caching."""
        return place(task, self.settings.cluster, cache=cache)

    def step(self, component: str, stage: str, *, cache: bool = True, overrides=None, **inputs):
        """A stage's step with its settings and overrides (the run's, unless given); on
        the GPU pool when the stage's settings name an accelerator."""
        given = self.overrides[stage] if overrides is None else overrides
        task = getattr(self.parts, component)(
            settings=self.sections[stage], overrides=given, **inputs
        )
        config = getattr(self.settings, stage)
        return place(
            task,
            self.settings.cluster,
            cache=cache,
            accelerator_type=getattr(config, "accelerator_type", ""),
            accelerator_limit=getattr(config, "accelerator_limit", 1),
        )
