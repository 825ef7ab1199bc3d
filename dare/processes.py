"""Stopping the child processes (`dare serve`, Locust, ...) that the demo, the benchmarks and the load tests start."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0, *, group: bool = False) -> None:
    """SIGTERM (uvicorn and Locust shut down gracefully on it), wait up to `timeout_s`, then SIGKILL.

    With `group`, signal the child's whole process group (a child started with `start_new_session=True` whose own
    children, e.g. uvicorn workers, must go too).
    """
    if process.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        except ProcessLookupError:  # it exited between poll() and the signal
            pass

    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()
