"""`lmforge serve MODEL --ray`: the app `lmforge serve` builds, as replicas on Ray Serve.

Each replica is a Ray actor that builds the very app of the plain server (`command.replica_app`:
same routes, limits, keys, engine) and runs it under Ray Serve's ASGI ingress; Ray's HTTP
proxy spreads requests over the replicas, restarts a replica whose actor dies or whose health
check fails, and adds or removes replicas when autoscaling is asked for. The health check
sends GET /health through the replica's own app, so a replica whose engine thread died is
replaced. Only the API keys' SHA-256 digests (`ApiKeys`) travel to the cluster, never the keys;
of an encrypted model's key, only where each replica reads it (`command.replica_app`).
Adapters are those given at start: the run-time admin routes would change one replica only.

Ray is imported only here, and only when a Ray deployment is asked for: the plain server
never loads it (`pip install 'lmforge[cluster]'`).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

from pydantic import field_validator, model_validator

from lmforge.config import Section
from lmforge.errors import LmforgeError
from lmforge.serve.settings import ServeSettings

RAY_FLAGS = {"address": "ray-address"}  # RayOptions fields whose flag is spelled otherwise
APP_NAME = "lmforge"  # the Ray Serve application and deployment name
REPLICA_HEADER = b"x-lmforge-replica"  # which replica answered: Ray's id of it
# Ray Serve checks each replica this often and replaces it after 3 failed checks in a row. The check is
# an in-process GET /health (no network, no model work), so checking twice Ray's rate costs nothing.
HEALTH_CHECK_PERIOD_S = 5.0
# Ray Serve's own defaults: add a replica after 30 s of load above target, remove one after 10 quiet minutes.
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 30.0, 600.0
LOOK_BACK_S = (2.0, 30.0)  # the load is averaged over the upscale delay, within these bounds


class RayOptions(Section):
    """How many replicas, where, and how they scale (the --replicas/--ray-*/--autoscale-* flags)."""

    replicas: int | None = None  # None: 1, or the autoscaling minimum
    address: str | None = None  # None: start a local Ray instance; "auto" or "HOST:PORT": join that cluster
    autoscale_min: int | None = None
    autoscale_max: int | None = None
    target_ongoing_requests: float | None = None  # per replica, for autoscaling; None: --max-batch
    upscale_delay: float | None = None  # seconds the load must stay above target before a replica is added
    downscale_delay: float | None = None  # seconds it must stay below before one is removed

    @field_validator("replicas")
    @classmethod
    def _at_least_one(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("target_ongoing_requests")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("must be more than 0")
        return v

    @field_validator("upscale_delay", "downscale_delay")
    @classmethod
    def _not_negative(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError("must be 0 or more (seconds)")
        return v

    @model_validator(mode="after")
    def _scaling(self) -> "RayOptions":
        if not self.autoscaling:
            steering = [f"--{name.replace('_', '-')}" for name in ("target_ongoing_requests", "upscale_delay",
                                                                   "downscale_delay") if getattr(self, name) is not None]
            if steering:
                raise ValueError(f"{', '.join(steering)} steer{'s' if len(steering) == 1 else ''} autoscaling: "
                                 "give --autoscale-max too")
            return self
        if self.autoscale_max is None:
            raise ValueError("--autoscale-min needs --autoscale-max (the most replicas to start)")
        low = 1 if self.autoscale_min is None else self.autoscale_min
        if low < 0 or self.autoscale_max < max(low, 1):
            raise ValueError(f"autoscaling needs 0 <= --autoscale-min <= --autoscale-max and --autoscale-max >= 1 "
                             f"(got {low} and {self.autoscale_max})")
        if self.replicas is not None and not low <= self.replicas <= self.autoscale_max:
            raise ValueError(f"--replicas {self.replicas} (the replicas to start with) is outside "
                             f"--autoscale-min {low} .. --autoscale-max {self.autoscale_max}")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.autoscale_min is not None or self.autoscale_max is not None

    def deployment_options(self, settings: ServeSettings, device: str, threads: int | None) -> dict:
        """The `serve.deployment` options for these flags and the server's settings."""
        options = {
            "name": APP_NAME,
            # What one plain server accepts at once: beyond its batch and queue the engine answers 503 itself.
            "max_ongoing_requests": settings.max_batch + settings.max_queue,
            "ray_actor_options": {"num_cpus": threads or 1, **({"num_gpus": 1} if device.startswith("cuda") else {})},
            # a replica that cannot load the model fails the deployment after a few tries, not Ray's default 20
            "max_constructor_retry_count": 3,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        }
        if not self.autoscaling:
            options["num_replicas"] = self.replicas or 1
            return options
        low = 1 if self.autoscale_min is None else self.autoscale_min
        up = UPSCALE_DELAY_S if self.upscale_delay is None else self.upscale_delay
        # "Above target for 10 s" should mean the last 10 s of load: a longer window would lag behind the
        # delay, a shorter one make the decision jumpy. Each replica and the proxy report the load three
        # times a window (Ray's defaults, 10 s reports over a 30 s window, at the default delay).
        look_back = min(max(up, LOOK_BACK_S[0]), LOOK_BACK_S[1])
        scaling = {"min_replicas": low, "max_replicas": self.autoscale_max,
                   # a replica whose batch is full is busy: more requests than that wait in its engine's queue
                   "target_ongoing_requests": self.target_ongoing_requests or settings.max_batch,
                   "upscale_delay_s": up,
                   "downscale_delay_s": DOWNSCALE_DELAY_S if self.downscale_delay is None else self.downscale_delay,
                   "look_back_period_s": look_back, "metrics_interval_s": look_back / 3}
        if self.replicas is not None:
            scaling["initial_replicas"] = self.replicas
        options["autoscaling_config"] = scaling
        return options


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that made it (for operators and the tests)."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, send_with_replica)


class FixedAdapters:
    """ASGI middleware: POST and DELETE /admin/adapters answer 403 on a replica, since a change made
    there would reach that replica alone; the adapters are those given at start (--adapter NAME=DIR)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/admin/adapters"):
            from lmforge.serve.errors import error_response

            answer = error_response(403, "adapters cannot be loaded or unloaded at run time on Ray Serve replicas "
                                         "(a change would reach one replica only): give them at start with "
                                         "--adapter NAME=DIR", "permission_error")
            return await answer(scope, receive, send)
        return await self.app(scope, receive, send)


async def get_status(app, path: str) -> int | None:
    """The status an ASGI app answers to `GET path` from loopback, called in-process."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    status = None

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def replica_class():
    """The Ray Serve deployment class: one replica builds and runs one lmforge app."""
    from ray import serve

    class LmforgeReplica:
        def __init__(self, make_app: Callable, threads: int | None):
            import torch

            if threads is not None:
                torch.set_num_threads(threads)
            app = make_app()
            app.add_middleware(FixedAdapters)
            app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
            self.lmforge_app = app

        def __serve_build_asgi_app__(self):
            return self.lmforge_app

        async def check_health(self):
            status = await get_status(self.lmforge_app, "/health")
            if status != 200:
                raise RuntimeError(f"GET /health answered {status}")

    return serve.ingress()(LmforgeReplica)


def deploy(make_app: Callable, settings: ServeSettings, options: RayOptions, host: str, port: int,
           device: str = "cpu", threads: int | None = None):
    """Start Ray Serve's proxy on host:port (on a connected Ray) and run replicas of the app `make_app()`
    builds (a picklable callable: it is called in each replica); waits until they are up."""
    from ray import serve

    deployment = serve.deployment(replica_class(), **options.deployment_options(settings, device, threads))
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(deployment.bind(make_app, threads), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica's constructor raised: Ray's message ends with the replica's error
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise LmforgeError(f"the Ray Serve deployment failed: {lines[-1] if lines else e}") from None


def run(make_app: Callable, settings: ServeSettings, options: RayOptions, host: str, port: int,
        device: str = "cpu", threads: int | None = None) -> None:
    """`lmforge serve --ray`: deploy, print where, serve until Ctrl-C or SIGTERM, then take the replicas down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LmforgeError("--ray needs Ray Serve: pip install 'lmforge[cluster]' (or 'ray[serve]')") from None
    local = options.address is None
    try:
        ray.init(address=options.address, include_dashboard=False if local else None, log_to_driver=False)
    except ConnectionError as e:
        raise LmforgeError(f"cannot join the Ray cluster at --ray-address {options.address}: {e}") from None

    def interrupt(*_):
        raise KeyboardInterrupt

    # SIGTERM (kill, docker stop, a pod's end) ends the command as Ctrl-C does, even while deploying.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        deploy(make_app, settings, options, host, port, device, threads)
        replicas = (f"{options.replicas or 1} replicas" if not options.autoscaling else
                    "{min_replicas}..{max_replicas} replicas (autoscaling)".format(
                        **options.deployment_options(settings, device, threads)["autoscaling_config"]))
        where = "a local Ray instance" if local else f"the Ray cluster at {options.address}"
        print(f"serving {settings.model_name} on http://{host}:{port} as {replicas} on {where} "
              f"({'API keys required' if settings.api_keys else 'no API keys (loopback only)'}); API at /v1",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("taking the replicas down", file=sys.stderr)
        try:
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
