"""fewstep: distil multi-step diffusion models into one- or few-step generators."""
__version__ = "0.1.0"

from .errors import FewstepError  # noqa: E402

__all__ = ["FewstepError", "__version__"]
