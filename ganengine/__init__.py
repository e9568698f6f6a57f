"""ganengine: fused GPU/CPU kernels for GAN training, and the GANs built on them."""
from ganengine import backends
from ganengine.backends import use_backend
from ganengine.fuse import fuse

__version__ = "0.1.0"

__all__ = ["backends", "use_backend", "fuse", "functional", "nn", "__version__"]


def __getattr__(name):  # lazy subpackages keep `import ganengine` cheap
    import importlib

    if name in ("functional", "nn", "ops", "models", "data", "train", "metrics", "export", "kernels"):
        return importlib.import_module(f"ganengine.{name}")
    raise AttributeError(f"module 'ganengine' has no attribute {name!r}")
