"""Resuming past a damaged checkpoint: the newest checkpoint whose files all read is the
one a run resumes from, and the log says which and why; when none reads, one line names
the damaged file and what to do."""

from __future__ import annotations

import logging
from typing import Any

from embedpipe.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def latest_readable(found: list[tuple[int, str]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(uri, config, training state) of the newest of ``found`` (oldest first) that reads."""
    damaged: list[str] = []
    for _, uri in reversed(found):
        try:
            config = ckpt.read_config(uri)
            state = ckpt.read_training_state(uri)
            ckpt.read_history(uri)
        except ckpt.DamagedCheckpoint as error:
            damaged.append(str(error))
            continue
        if damaged:
            log.warning("%s; resuming from the earlier checkpoint %s", damaged[0], uri)
        return uri, config, state
    others = f" (and the {len(damaged) - 1} earlier one(s) too)" if len(damaged) > 1 else ""
    folder = found[-1][1].rsplit("/", 1)[0]
    raise ckpt.DamagedCheckpoint(
        f"{damaged[0]}{others}; no earlier checkpoint to resume from: delete {folder} to "
        "start this training over, or give another --out"
    )
