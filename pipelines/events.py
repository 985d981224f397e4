"""The Prefect event a new shard sends when it lands: what starts the ``watch`` deployment.

``cssl ingest`` emits :data:`SHARD_PUBLISHED` after it has published a shard, when it talks to
a Prefect server (``PREFECT_API_URL`` is set); with no server there is nobody to tell and
nothing is sent. The ``watch`` deployment of ``infra/prefect.yaml`` has an event trigger on
it that passes the period and the shard's path as the flow's parameters:

    event     cssl.shard.published
    resource  prefect.resource.id = cssl.shard.<period>, cssl.period = <period>,
              cssl.path = <shard directory>
    payload   period, path, fingerprint, frames

The path must be readable where the watch runs (a shared volume, or the same machine).
"""

from __future__ import annotations

import os
from typing import Any

SHARD_PUBLISHED = "cssl.shard.published"
RESOURCE_PREFIX = "cssl.shard."


def shard_resource(period: str, path: str) -> dict[str, str]:
    """The event's resource: which shard landed, and where."""
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{period}",
        "prefect.resource.name": f"shard {period}",
        "cssl.period": period,
        "cssl.path": path,
    }


def emit_shard_published(period: str, path: str, manifest: dict[str, Any]) -> bool:
    """Tell the Prefect server at ``PREFECT_API_URL`` that a shard landed (see the module
    docstring); False when the variable is not set and nothing was sent (checking only the
    variable keeps ``cssl ingest`` from importing Prefect when there is no server)."""
    if not os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.events import emit_event

    payload = {
        "period": period,
        "path": path,
        "fingerprint": manifest.get("fingerprint", ""),
        "frames": manifest.get("num_rows", 0),
    }
    emit_event(SHARD_PUBLISHED, resource=shard_resource(period, path), payload=payload)
    return True
