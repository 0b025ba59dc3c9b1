"""`lmforge serve --ray`: the server's app as replicas on Ray Serve, on a local Ray instance of 2 CPUs."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
import torch
from ray import serve
from serve_helpers import KEY, Server, free_port

from lmforge.errors import LmforgeError
from lmforge.interop.crypto import read_key
from lmforge.infer.engine import Engine, EngineOverloaded, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.app import create_app
from lmforge.serve.command import build_app, ray_options
from lmforge.serve.ray_deploy import APP_NAME, REPLICA_HEADER, RayOptions, ReplicaHeader, get_status
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings

REPLICA = REPLICA_HEADER.decode()
QUESTIONS = ["Who is Romeo?", "什么是 KV cache？", "<nav>Home | About</nav> The king is dead!", "ROMEO: But soft"]


def ask(client: openai.OpenAI, question: str, model: str = "tiny") -> tuple[str, str]:
    """(the greedy answer, the replica that gave it)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers.get(REPLICA, "")


def running_replicas() -> set[str]:
    """The ids of the replica actors, once Ray Serve reports them all running (else empty)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#"
    ids = {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith(prefix)}
    states = serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states
    return ids if states.get("RUNNING", 0) == len(ids) else set()


def wait_for_replicas(check, what: str, seconds: float = 180) -> set[str]:
    """The running replicas' ids once `check(ids)` holds; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while not ((ids := running_replicas()) and check(ids)):
        assert time.monotonic() < deadline, f"{what}: {serve.status()}"
        time.sleep(0.5)
    return ids


def stop_engine_thread(_replica_actor=None, before_it_wakes=lambda engine: None, engine=None) -> bool:
    """Runs inside a replica's process (through Ray's `__ray_call__`; its one engine) or in this one
    (`engine`'s, beside other tests' engines): the engine's thread dies of an exception its error
    handler does not catch, as a thread does of a fatal error. True once it is dead."""
    import ctypes
    import threading

    if engine is None:
        (thread,) = [t for t in threading.enumerate() if t.name == "lmforge-engine"]
        engine = thread._target.__self__
    thread = engine._thread
    with engine._wake:  # an idle engine waits on this: wake it so that it runs into the exception
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
        before_it_wakes(engine)
        engine._wake.notify()
    thread.join(10)
    return not thread.is_alive()


class Load:
    """`streams` clients, each asking one question after another until the block ends: sustained load."""

    def __init__(self, client: openai.OpenAI, streams: int):
        self.client, self.streams, self.stop = client, streams, threading.Event()
        self.replicas, self.errors = Counter(), Counter()

    def __enter__(self) -> "Load":
        self.pool = ThreadPoolExecutor(self.streams)
        self.futures = [self.pool.submit(self._ask, i) for i in range(self.streams)]
        return self

    def _ask(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                self.replicas[ask(self.client, QUESTIONS[i % 4])[1]] += 1
            except openai.APIError as e:  # a replica killed or broken under the load: it goes on
                self.errors[getattr(e, "status_code", None) or type(e).__name__] += 1
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.pool.shutdown()
        for f in self.futures:
            f.result()


@pytest.fixture()
def encrypted_model_and_adapter(tiny_model_dir, tmp_path):
    """(an encrypted copy of the tiny model, its key file, a LoRA adapter of it, the plain model)."""
    import lmforge
    from lmforge.adapters import apply_lora, save_adapter
    from lmforge.interop.crypto import encrypt_model_dir, new_key_file
    from lmforge.model.lora import LoraSettings, lora_layers

    sealed = shutil.copytree(tiny_model_dir, tmp_path / "sealed-model")
    key_file = tmp_path / "model.key"
    encrypt_model_dir(sealed, new_key_file(key_file))
    model = apply_lora(lmforge.load(tiny_model_dir).model, LoraSettings(r=4, alpha=8, targets="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    adapter = save_adapter(model, tmp_path / "adapters" / "support", base=str(tiny_model_dir))
    return sealed, key_file, adapter, tiny_model_dir


def expected_answers(model_dir, adapter) -> dict[str, list[str]]:
    """The greedy answers of one plain server (unencrypted weights), for the base and the adapter."""
    app = build_app(model_dir, ServeSettings(model_name="tiny", max_batch=4), adapters=[("support", adapter)])
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return {model: [ask(client, q, model)[0] for q in QUESTIONS] for model in ("tiny", "support")}


def start_cli_deployment(cli, model_dir, keys, port: int, *flags):
    """`lmforge serve --ray` joining this process's Ray instance (started, not yet up)."""
    address = ray.get_runtime_context().gcs_address
    return cli("serve", model_dir, "--ray", "--ray-address", address, "--threads", "1", "--port", port,
               "--api-key-file", keys, "--served-model-name", "tiny", "--max-batch", "4", "--max-queue", "16", *flags,
               popen=True)


@pytest.mark.slow
def test_replicas_autoscale_share_requests_and_are_replaced_when_killed_or_unhealthy(cli, encrypted_model_and_adapter,
                                                                                      tmp_path, wait_healthy):
    """One deployment through the real CLI, of an encrypted model with a LoRA adapter, autoscaling 1..2."""
    sealed, key_file, adapter, plain = encrypted_model_and_adapter
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    proc = None
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        keys = tmp_path / "keys.txt"
        keys.write_text(f"# API keys\n{KEY}\n")
        proc = start_cli_deployment(cli, sealed, keys, port, "--key-file", key_file, "--adapter", f"support={adapter}",
                                    "--autoscale-min", "1", "--autoscale-max", "2", "--target-ongoing-requests", "0.5",
                                    "--upscale-delay", "2", "--downscale-delay", "8")
        assert KEY not in " ".join(map(str, proc.args))  # keys come from the file, never the command line
        expected = expected_answers(plain, adapter)  # while the replica starts
        assert expected["support"] != expected["tiny"]  # the adapter changes the answers
        wait_healthy(url, proc, timeout=180)  # the proxy reaches a running replica's app
        wait_for_replicas(bool, "not every replica runs")
        (first,) = running_replicas()
        deployed = time.monotonic()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        with Load(client, streams=1) as load:  # ~1 request in flight, 0.5 the target: a second replica
            ids = wait_for_replicas(lambda ids: len(ids) == 2, "no second replica under load")
            scaled_up = time.monotonic()

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: ask(client, QUESTIONS[i % 4], ("tiny", "support")[i % 2]), range(24)))
            served = Counter(replica for _, replica in answers)
            assert set(served) == ids, served  # Ray's proxy spread the requests over both replicas
            # Both replicas decrypted the weights and applied the adapter as one plain server does.
            assert [text for text, _ in answers] == [expected[("tiny", "support")[i % 2]][i % 4] for i in range(24)]

            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                    max_tokens=8, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["tiny"][1]
            assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed, as on the plain server
            assert httpx.get(url + "/v1/models").status_code == 401
            assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
            assert [m.id for m in client.models.list().data] == ["tiny", "support"]
            unload = httpx.delete(url + "/admin/adapters/support", headers={"Authorization": f"Bearer {KEY}"})
            assert unload.status_code == 403 and "one replica only" in unload.json()["error"]["message"]

            victim = sorted(ids)[0]
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#{victim}", namespace="serve"), no_restart=True)
            killed = time.monotonic()
            after = [ask(client, QUESTIONS[i % 4]) for i in range(6)]  # at once: the survivor answers them
            assert [text for text, _ in after] == [expected["tiny"][i % 4] for i in range(6)]
            assert victim not in {replica for _, replica in after}
            ids = wait_for_replicas(lambda ids: len(ids) == 2 and victim not in ids, "no replacement replica")
            replaced = time.monotonic()

            broken = sorted(ids)[0]
            actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#{broken}", namespace="serve")
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica cannot import this file
            assert ray.get(actor.__ray_call__.remote(stop_engine_thread), timeout=30)
            broke = time.monotonic()
            # Its /health answers 503 now: Ray Serve's health check fails and the replica is replaced.
            ids = wait_for_replicas(lambda ids: len(ids) == 2 and broken not in ids, "the unhealthy replica stayed")
            healed = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                again = list(pool.map(lambda i: ask(client, QUESTIONS[i % 4]), range(16)))
            assert {replica for _, replica in again} <= ids and len({r for _, r in again}) == 2
            assert [text for text, _ in again] == [expected["tiny"][i % 4] for i in range(16)]
        assert first in load.replicas, load.replicas
        assert set(load.errors) <= {500, 502, 503}, load.errors  # only while a replica was down

        stopped = time.monotonic()  # no load: back to the minimum of one replica
        (last,) = wait_for_replicas(lambda ids: len(ids) == 1, "no scale-down after the load")
        scaled_down = time.monotonic()
        assert ask(client, QUESTIONS[0]) == (expected["tiny"][0], last)

        proc.send_signal(signal.SIGINT)  # Ctrl-C: lmforge deletes its application and leaves the cluster
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "as 1..2 replicas (autoscaling) on the Ray cluster at" in err and "taking the replicas down" in err
        assert APP_NAME not in serve.status().applications
        print(f"deploy {deployed - started:.1f} s, second replica {scaled_up - deployed:.1f} s after the load began, "
              f"replacement {replaced - killed:.1f} s after the kill and {healed - broke:.1f} s after the engine died, "
              f"back to 1 replica {scaled_down - stopped:.1f} s after the load stopped; total "
              f"{time.monotonic() - started:.1f} s; served {dict(served)}, load {dict(load.replicas)} "
              f"errors {dict(load.errors)}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        serve.shutdown()
        ray.shutdown()


def test_ray_options_become_ray_serve_deployment_options():
    settings = ServeSettings(model_name="m", max_batch=8, max_queue=32)
    fixed = RayOptions(replicas=3).deployment_options(settings, "cpu", threads=2)
    assert fixed == {"name": APP_NAME, "max_ongoing_requests": 40, "num_replicas": 3,
                     "ray_actor_options": {"num_cpus": 2}, "max_constructor_retry_count": 3,
                     "health_check_period_s": 5.0}
    # Ray Serve's own delays and load window by default (30 s up, 10 min down, 10 s reports over 30 s)
    scaling = RayOptions(autoscale_min=1, autoscale_max=4, replicas=2).deployment_options(settings, "cuda", None)
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                             "initial_replicas": 2, "upscale_delay_s": 30.0,
                                             "downscale_delay_s": 600.0, "look_back_period_s": 30.0,
                                             "metrics_interval_s": 10.0}
    assert scaling["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1} and "num_replicas" not in scaling
    from ray.serve.config import AutoscalingConfig

    assert AutoscalingConfig(**scaling["autoscaling_config"]) == AutoscalingConfig(
        min_replicas=1, max_replicas=4, target_ongoing_requests=8, initial_replicas=2)
    # A short upscale delay averages the load over as short a window (2 s at least), reported 3 times in it.
    quick = RayOptions(autoscale_max=2, target_ongoing_requests=3, upscale_delay=0.5, downscale_delay=0)
    assert quick.deployment_options(settings, "cpu", None)["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3, "upscale_delay_s": 0.5,
        "downscale_delay_s": 0, "look_back_period_s": 2.0, "metrics_interval_s": 2 / 3}
    slow = RayOptions(autoscale_max=2, upscale_delay=120).deployment_options(settings, "cpu", None)
    assert slow["autoscaling_config"]["look_back_period_s"] == 30.0


@pytest.mark.parametrize("flags, message", [
    ({"replicas": 0}, "--replicas must be at least 1"),
    ({"autoscale_min": 2}, "needs --autoscale-max"),
    ({"autoscale_min": 3, "autoscale_max": 2}, "autoscale-min <= --autoscale-max"),
    ({"autoscale_min": 0, "autoscale_max": 0}, "--autoscale-max >= 1"),
    ({"autoscale_min": 1, "autoscale_max": 2, "replicas": 5}, "outside"),
    ({"target_ongoing_requests": 4}, "give --autoscale-max too"),
    ({"autoscale_max": 2, "target_ongoing_requests": 0}, "more than 0"),
    ({"upscale_delay": 5, "downscale_delay": 60}, "--upscale-delay, --downscale-delay steer autoscaling"),
    ({"autoscale_max": 2, "downscale_delay": -1}, "--downscale-delay must be 0 or more"),
])
def test_ray_options_refuse_impossible_scaling(flags, message):
    with pytest.raises(LmforgeError, match=message):
        ray_options(True, **flags)


def test_serve_ray_flags_are_checked_before_ray_starts(cli, tiny_model_dir, monkeypatch):
    done = cli("serve", tiny_model_dir, "--replicas", "2", "--ray-address", "auto", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --replicas, --ray-address: these set up Ray Serve replicas; "
                                                "add --ray"]
    done = cli("serve", tiny_model_dir, "--ray", "--autoscale-min", "3", "--autoscale-max", "2", timeout=120)
    assert done.returncode == 2 and "autoscale-min <= --autoscale-max" in done.stderr
    assert "Traceback" not in done.stderr

    from lmforge.serve.command import ray_options, serve

    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    with pytest.raises(LmforgeError, match="without API keys"):  # Ray's proxy on 0.0.0.0 needs keys like the server
        serve(tiny_model_dir, "0.0.0.0", 0, None, allow_no_auth=False, settings={},
              ray=ray_options(True, replicas=2, address=None, autoscale_min=None, autoscale_max=None,
                              target_ongoing_requests=None))
    assert not ray.is_initialized()


def test_serve_ray_checks_the_model_key_and_refuses_run_time_adapters_before_ray_starts(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    from lmforge.interop.crypto import command_key, encrypt_model_dir, new_key_file
    from lmforge.serve.command import serve

    sealed = shutil.copytree(tiny_model_dir, tmp_path / "sealed")
    encrypt_model_dir(sealed, new_key_file(tmp_path / "model.key"))
    other = tmp_path / "other.key"
    new_key_file(other)
    monkeypatch.delenv("LMFORGE_MODEL_KEY", raising=False)
    cluster = ray_options(True, replicas=2)

    def deploy(**flags):
        serve(sealed, "127.0.0.1", 0, None, allow_no_auth=False, settings={}, ray=cluster, **flags)

    with pytest.raises(LmforgeError, match="is encrypted: give its key"):
        deploy()
    with command_key(read_key(other), (other, None)), pytest.raises(LmforgeError, match="wrong key"):
        deploy()
    with pytest.raises(LmforgeError, match="^--adapter-root cannot be used with --ray: an adapter loaded at run "
                                           "time would reach one replica only; give each adapter at start as "
                                           "--adapter NAME=DIR$"):
        deploy(adapter_root=tmp_path)
    assert not ray.is_initialized()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death on purpose
def test_the_replica_health_check_asks_the_apps_own_health_route(tiny):
    """What Ray's health check calls (in-process, through the app's middleware), and the replica header."""
    engine = Engine(*tiny, max_batch=2, max_queue=2)
    app = create_app(engine, ServeSettings(model_name="tiny", api_keys=ApiKeys([KEY])))
    app.add_middleware(ReplicaHeader, replica="r1")
    assert asyncio.run(get_status(app, "/health")) == 503  # the engine is not running: Ray would replace it
    engine.start()
    try:
        assert asyncio.run(get_status(app, "/health")) == 200
        assert asyncio.run(get_status(app, "/v1/models")) == 401  # the rest still needs a key
    finally:
        engine.stop()
    assert asyncio.run(get_status(app, "/health")) == 503

    engine.start()
    events = []  # a request queued as the engine thread dies: it fails, rather than waiting forever

    def queue_one(engine):
        engine.submit_many([Request(prompt=[1, 2, 3], params=SamplingParams(max_new_tokens=2))], [events.append])

    assert stop_engine_thread(None, queue_one, engine)
    assert [(e.finish_reason, e.error) for e in events] == [("error", "the engine's thread died")]
    assert asyncio.run(get_status(app, "/health")) == 503  # /health says so, and new requests are refused
    with pytest.raises(EngineOverloaded, match="not running"):
        engine.submit_many([Request(prompt=[1, 2, 3], params=SamplingParams(max_new_tokens=2))], [lambda e: None])
    engine.stop()

    async def replica_header():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return (await c.get("/health")).headers[REPLICA]

    assert asyncio.run(replica_header()) == "r1"
