"""``serve --trace EXPORT=TYPE:ARG[,option=value...]``: traces started with the server.

The specs are parsed before the service starts (a typo is an operator error, exit 2, nothing
opened), and the traces are started by a service startup hook: after the exports are open and
before the first client is accepted, so the stream holds every client write from the first.
They end with the server (the service's shutdown hook stops every trace cleanly).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from blocktrace.errors import UsageError
from blocktrace.trace.options import TraceSpec, parse_trace_spec

if TYPE_CHECKING:
    from blocktrace.service import Service

log = logging.getLogger("blocktrace.trace")


def install_traces(service: Service, specs: tuple[str, ...] | list[str]) -> list[TraceSpec]:
    """Parse ``--trace`` values and register a startup hook that starts them."""
    parsed = [parse_trace_spec(s) for s in specs]
    ids = [p.job_id for p in parsed if p.job_id]
    if len(ids) != len(set(ids)):
        raise UsageError("--trace: duplicate job-id")
    if not parsed:
        return parsed

    async def start_traces(svc: Service) -> None:
        default = svc.registry.default
        used = set(ids)
        n = 0
        for spec in parsed:
            export = spec.export or (default.name if default is not None else "")
            if export not in svc.registry:
                raise UsageError(f"--trace: no export named {export!r}")
            job_id = spec.job_id
            if not job_id:
                while f"trace{n}" in used:
                    n += 1
                job_id = f"trace{n}"
            used.add(job_id)
            trace = await svc.traces.start(job_id, export, spec.target, spec.options)
            log.info(
                "trace %s: %s -> %s (%s)",
                job_id,
                export,
                trace.target.name,
                ", ".join(f"{k}={v}" for k, v in spec.options.to_dict().items()),
            )

    service.startup_hooks.append(start_traces)
    return parsed
