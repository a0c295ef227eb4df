"""embedpipe: images in, trained and published embedding models out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
