"""mmbrca: multimodal breast-cancer subtyping from H&E slides and gene expression."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmbrca")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
