"""Silence the deprecation noise LAVIS 1.0.2's dependencies print on import."""
import contextlib
import warnings


@contextlib.contextmanager
def quiet_lavis_import():
    """Hide the FutureWarning/DeprecationWarning/UserWarning spam of fairscale, timm and
    torch.jit that ``import lavis`` prints on modern torch. Errors still propagate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield
