"""embedpipe: images in, trained and published embedding models out."""

import logging
from importlib.metadata import PackageNotFoundError, version

# faiss logs each CPU-specific library it fails to load before the one that works; at INFO
# that reads like an error to users. Its real failures are raised, not logged.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
# The command line's log lines, and those of the training processes it starts.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

try:
    __version__ = version("embedpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
