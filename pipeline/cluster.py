"""Joining a Ray cluster (or starting a local one) for a stage, with one clear line when that fails."""

from __future__ import annotations

from pipeline.errors import SegpipeError


def connect(address: str | None, log_to_driver: bool = False, runtime_env: dict | None = None) -> bool:
    """Join `address`, or start a local Ray for this run; True when this call started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                 log_to_driver=log_to_driver, configure_logging=True, runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise SegpipeError(f"cannot reach the Ray cluster at {address or 'a new local instance'} ({error})") from None
    return True
