"""The reference server of the HTTP ingest benchmark: a bare Starlette app, nothing else.

``POST /api/v1/{token}/telemetry`` reads the body, parses it with ``msgspec.json.decode`` (the
parser Isthmus uses, for a fair comparison) and answers 200 with an empty body (400 when the body
is not JSON). No authentication, no journal, no storage: this is what the framework and the JSON
parse cost, the floor to compare Isthmus's device API with. ``bench/run.py`` runs it as

    python -m uvicorn ref_app:app --app-dir bench --host 127.0.0.1 --port PORT \\
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def telemetry(request: Request) -> Response:
    """Parse the JSON body and acknowledge it."""
    try:
        msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return Response(status_code=400)
    return Response(status_code=200)


app = Starlette(routes=[Route("/api/v1/{token}/telemetry", telemetry, methods=["POST"])])
