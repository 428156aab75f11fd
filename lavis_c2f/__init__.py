"""lavis-c2f: coarse-to-fine video corpus moment retrieval as a Salesforce LAVIS plugin.

Importing this package registers every component with ``lavis.common.registry`` under
``c2f_``-prefixed keys (models, dataset builders, tasks, processors, the runner).
Entry points import it before building a LAVIS ``Config``.
"""
from lavis_c2f._quiet import quiet_lavis_import

with quiet_lavis_import():
    import lavis  # noqa: F401  (LAVIS registers its own components on import)

from lavis_c2f.paths import register_lavis_paths
from lavis_c2f.registry_utils import install_lookup_errors

register_lavis_paths()
install_lookup_errors()

# Registration by explicit import (house style): each import registers its components.
from lavis_c2f import models  # noqa: E402,F401
from lavis_c2f import datasets  # noqa: E402,F401
from lavis_c2f import processors  # noqa: E402,F401
from lavis_c2f import tasks  # noqa: E402,F401
from lavis_c2f import runners  # noqa: E402,F401

from lavis_c2f.version import __version__  # noqa: E402,F401
