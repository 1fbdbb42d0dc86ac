"""Connecting to Ray: the one ``init_ray`` every stage calls (the embedding run, the index builds).

A node that does not come up, or a cluster that cannot be reached, is a one-line :class:`RayStartError`
saying what to do, not Ray's traceback.
"""

from __future__ import annotations

import logging
import os

from reembed.errors import ReembedError

log = logging.getLogger(__name__)

# Ray waits this long for a freshly started local node to register (ray/_private/node.py, not configurable).
NODE_START_TIMEOUT_S = 30


class RayStartError(ReembedError):
    """Ray could not be started or reached; the message says what to do."""


def init_ray(address: str | None) -> None:
    """Connect to a cluster (``address``, or ``RAY_ADDRESS`` as set by ``ray job submit``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": always a fresh local Ray, never some other cluster found on this machine.
            ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    except Exception as e:  # whatever stopped Ray from starting, the user gets one line and the next step
        _shutdown_quietly(ray)
        raise start_failed(e, address) from e


def start_failed(e: BaseException, address: str | None) -> RayStartError:
    """The one-line error for a failed ``ray.init``: what happened and what to do."""
    detail = " ".join(str(e).split())[:300] or type(e).__name__
    if "timed out during startup" in detail:
        return RayStartError(
            f"Ray's local node did not start within its {NODE_START_TIMEOUT_S} s limit (the machine is "
            "overloaded, or a Ray process failed: see /tmp/ray/session_latest/logs); free CPUs and memory, stop "
            "stale Ray processes (`ray stop`), or run on a started cluster with --address / RAY_ADDRESS, then rerun"
        )
    if address:
        return RayStartError(
            f"cannot connect to the Ray cluster at {address} ({detail}); check --address / RAY_ADDRESS and that "
            "the cluster's head is running, or leave both unset to start a local Ray"
        )
    return RayStartError(
        f"Ray did not start ({detail}); free CPUs, memory and /tmp space, stop stale Ray processes (`ray stop`), "
        "or run on a started cluster with --address / RAY_ADDRESS, then rerun"
    )


def _shutdown_quietly(ray) -> None:
    """Stop what a failed start left running, so a retry in this process begins clean."""
    try:
        ray.shutdown()
    except Exception as e:  # nothing more to do: the start already failed
        log.debug("ray.shutdown after a failed start: %s", e)
