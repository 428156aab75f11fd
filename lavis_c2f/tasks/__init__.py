"""c2f tasks (registered on import)."""
from lavis_c2f.tasks.base import C2FTask  # noqa: F401
from lavis_c2f.tasks import moment_retrieval  # noqa: F401,E402
from lavis_c2f.tasks import video_retrieval  # noqa: F401,E402
from lavis_c2f.tasks import corpus_moment_retrieval  # noqa: F401,E402
