"""What every pipeline does with stage settings: compile each stage's section into its
step, and say in the description what a run may override."""

from __future__ import annotations

import json

from embedpipe.config import Settings


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
