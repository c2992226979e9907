"""Files the wheel carries for users who install it without a clone: the production-shaped Envoy config
(`envoy-nexus.yaml`, the repository's envoy/nexus.yaml) and the admin API's protos (`protos/`), for their own
clients. Both are symlinks into the repository, resolved when the wheel is built.

    python -c "from nexus_extproc.assets import path; print(path('envoy-nexus.yaml'))"
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    return Path(str(resources.files(__name__) / name))
