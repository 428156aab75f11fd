"""The ``c2f_runner`` and the lr schedules it uses (registered on import)."""
from lavis_c2f.runners import schedulers  # noqa: F401
from lavis_c2f.runners.c2f_runner import C2FRunner  # noqa: F401
