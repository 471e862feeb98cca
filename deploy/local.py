"""``rag4dmc serve``: the application on this machine's Ray (or the cluster it joins) until SIGINT or SIGTERM,
then a bounded shutdown.
"""

import logging
import os
import signal
import threading

import ray
from ray import serve

from rag4dmc.deploy.app import APP_NAME, compose
from rag4dmc.deploy.deployments import COMPLETE_PATH
from rag4dmc.pipeline.config import (
    ServeConfig,
)

log = logging.getLogger(__name__)


SHUTDOWN_S = 8.0  # ``rag4dmc serve`` exits this long after SIGINT/SIGTERM at most, its Ray processes with it


def run_local(cfg: ServeConfig, host: str, port: int) -> None:
    """Serve ``cfg`` at http://host:port until SIGINT (Ctrl-C) or SIGTERM (``rag4dmc serve``).

    Then the application is deleted and Ray shut down (the local cluster ``ray.init`` started goes with it),
    within ``SHUTDOWN_S``; past that the process exits anyway."""

    if "://" not in cfg.kb:  # a replica resolves a relative path in its own working directory
        cfg = cfg.model_copy(update={"kb": os.path.abspath(cfg.kb)})
    stop = threading.Event()
    started_ray = not ray.is_initialized()
    previous: dict = {}
    try:
        if started_ray:
            ray.init()  # installs Ray's own SIGTERM handler: ours go in after it
        serve.start(http_options={"host": host, "port": port})

        def on_signal(signum, frame) -> None:
            if not serving.is_set():  # still deploying: interrupt serve.run
                raise KeyboardInterrupt
            stop.set()

        serving = threading.Event()
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.run(compose(cfg), name=APP_NAME, route_prefix="/")  # returns once every replica is up
        serving.set()
        print(f"rag4dmc: serving {cfg.kb} at http://{host}:{port}{COMPLETE_PATH} (Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # a signal while starting
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown(ray, started_ray)


def _shutdown(ray, started_ray: bool) -> None:
    """Delete the app, and shut Ray down if this process started it (else the cluster's other apps stay), within
    ``SHUTDOWN_S``: a replica stuck in a request must not keep the process alive, so past the bound it exits
    (a local cluster's processes die with their driver)."""
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(SHUTDOWN_S):
            log.warning("shutdown took over %.0f s; exiting", SHUTDOWN_S)
            os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    print("rag4dmc: stopping", flush=True)
    try:
        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME, _blocking=False)
        except Exception as exc:  # noqa: BLE001 - not deployed yet (stopped while starting)
            log.info("no application to delete (%s)", exc)
        if started_ray:
            ray.shutdown()
    finally:
        done.set()
