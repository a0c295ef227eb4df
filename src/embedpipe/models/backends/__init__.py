"""One backend per model library; ``backend_for`` picks an entry's."""

from embedpipe.models.backends.base import Backend
from embedpipe.models.backends.open_clip import OpenClipBackend
from embedpipe.models.backends.signal import SignalBackend
from embedpipe.models.backends.transformers import TransformersBackend
from embedpipe.models.registry import ModelEntry, ModelError

BACKENDS: dict[str, Backend] = {
    "open_clip": OpenClipBackend(),
    "transformers": TransformersBackend(),
    "signal": SignalBackend(),
}


def backend_for(entry: ModelEntry) -> Backend:
    try:
        return BACKENDS[entry.library]
    except KeyError:
        # The registry's Literal rejects this on validation; an entry built without
        # validation (model_construct, model_copy(update=...)) still gets a clear error.
        raise ModelError(
            f"{entry.name}: unknown library '{entry.library}'; known: {', '.join(sorted(BACKENDS))}"
        ) from None
