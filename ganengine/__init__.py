"""ganengine: fused GPU/CPU kernels for GAN training, and the GANs built on them."""
from ganengine import backends
from ganengine.backends import BackendFallbackError, use_backend
from ganengine.fuse import fuse

__version__ = "0.1.0"

__all__ = ["backends", "use_backend", "BackendFallbackError", "fuse", "functional", "nn", "__version__"]


def _warn_bad_settings() -> None:
    """A bad GANENGINE_* value (or a misspelt name) is warned once, at import (settings.py); the
    command line reports them itself and stops."""
    import os
    import sys

    if not any(k.startswith("GANENGINE_") for k in os.environ):
        return
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "ganengine" or argv0.endswith(os.path.join("ganengine", "__main__.py")):
        return
    import warnings

    from ganengine import settings

    for line in settings.problems():
        warnings.warn(line, RuntimeWarning, stacklevel=3)


_warn_bad_settings()


def __getattr__(name):  # lazy subpackages keep `import ganengine` cheap
    import importlib

    if name in ("functional", "nn", "ops", "models", "data", "train", "metrics", "export", "kernels"):
        return importlib.import_module(f"ganengine.{name}")
    raise AttributeError(f"module 'ganengine' has no attribute {name!r}")
