"""A real uvicorn serving terdit-edge's app on 127.0.0.1, port 0, in a background thread (for tests)."""
from __future__ import annotations

import threading
import time

import uvicorn

from terdit_edge.frontends.server.app import create_app
from terdit_edge.frontends.server.jobs import JobManager, Limits
from terdit_edge.frontends.server.main import bind_socket


class LiveServer:
    """Start with ``LiveServer(manager, api_keys).start()``; ``url``; ``stop()``."""

    def __init__(self, manager: JobManager, api_keys=None):
        self.manager = manager
        self.app = create_app(manager, api_keys)
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_model: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_model and not self.manager.wait_ready(60):
            raise RuntimeError("the model did not load")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def bundled_manager(step_delay: float = 0.0, **limits) -> JobManager:
    """The bundled model behind a JobManager. ``step_delay`` seconds are added to every model call, so
    that a test watching a job from outside (a browser) sees it run for a while on a fast machine too:
    the images are unchanged, only slower."""
    from terdit_edge.pipeline import Pipeline

    def load():
        pipe = Pipeline.load()
        if step_delay:
            pipe.model = _Slowed(pipe.model, step_delay)
        return pipe

    return JobManager(load, Limits(**limits), model_name="digits.tdit")


class _Slowed:
    """A model that sleeps before each call and otherwise is the wrapped one."""

    def __init__(self, model, delay: float):
        self._model, self._delay = model, delay

    def __call__(self, x, t, y):
        time.sleep(self._delay)
        return self._model(x, t, y)

    def __getattr__(self, name):
        return getattr(self._model, name)
