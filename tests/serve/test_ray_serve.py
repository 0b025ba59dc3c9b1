"""`lmforge serve --ray`: the server's app as replicas on Ray Serve, on a local Ray instance of 2 CPUs."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve
from serve_helpers import KEY

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.serve.app import create_app
from lmforge.serve.command import ray_options
from lmforge.serve.ray_deploy import APP_NAME, REPLICA_HEADER, RayOptions, ReplicaHeader, get_status
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings

REPLICA = REPLICA_HEADER.decode()
QUESTIONS = ["Who is Romeo?", "什么是 KV cache？", "<nav>Home | About</nav> The king is dead!", "ROMEO: But soft"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client: openai.OpenAI, question: str) -> tuple[str, str]:
    """(the greedy answer, the replica that gave it)."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers[REPLICA]


def running_replicas() -> set[str]:
    """The ids of the replica actors, once Ray Serve reports them all running (else empty)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#"
    ids = {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith(prefix)}
    states = serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states
    return ids if states.get("RUNNING", 0) == len(ids) else set()


def start_cli_deployment(cli, model_dir, keys, port: int):
    """`lmforge serve --ray` joining this process's Ray instance; returns the process once both replicas run."""
    address = ray.get_runtime_context().gcs_address
    proc = cli("serve", model_dir, "--ray", "--ray-address", address, "--replicas", "2", "--threads", "1",
               "--port", port, "--api-key-file", keys, "--served-model-name", "tiny", "--max-batch", "4",
               "--max-queue", "16", popen=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if len(running_replicas()) == 2 and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except (httpx.TransportError, KeyError):  # KeyError: the application is not there yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"lmforge serve --ray did not come up: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_two_replicas_share_requests_and_survive_a_killed_replica(cli, tiny_model_dir, tmp_path):
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    proc = None
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        keys = tmp_path / "keys.txt"
        keys.write_text(f"# API keys\n{KEY}\n")
        proc = start_cli_deployment(cli, tiny_model_dir, keys, port)
        assert KEY not in " ".join(map(str, proc.args))  # keys come from the file, never the command line
        deployed = time.monotonic()

        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(client, QUESTIONS[i % 4]), range(24)))
        served = Counter(replica for _, replica in answers)
        assert len(served) == 2, served  # Ray's proxy spread the requests over both replicas
        for i, (text, _) in enumerate(answers):  # the same weights: the same greedy answer from either replica
            assert text == answers[i % 4][0] and text

        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers[1][0]
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed, as on the plain server
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401

        victim = sorted(served)[0]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#{victim}", namespace="serve"), no_restart=True)
        killed = time.monotonic()
        after = [ask(client, QUESTIONS[i % 4]) for i in range(6)]  # at once: the survivor answers them
        assert [text for text, _ in after] == [answers[i % 4][0] for i in range(6)]
        assert victim not in {replica for _, replica in after}

        deadline = time.monotonic() + 60  # Ray Serve starts a replacement to get back to 2
        while not (len(ids := running_replicas()) == 2 and victim not in ids):
            assert time.monotonic() < deadline, f"no replacement replica: {serve.status()}"
            time.sleep(0.5)
        replaced = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda i: ask(client, QUESTIONS[i % 4]), range(16)))
        assert {replica for _, replica in again} == ids
        assert [text for text, _ in again] == [answers[i % 4][0] for i in range(16)]

        proc.send_signal(signal.SIGINT)  # Ctrl-C: lmforge deletes its application and leaves the cluster
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "as 2 replicas on the Ray cluster at" in err and "taking the replicas down" in err
        assert APP_NAME not in serve.status().applications
        print(f"deploy {deployed - started:.1f} s, replacement up {replaced - killed:.1f} s after the kill, "
              f"total {time.monotonic() - started:.1f} s; served {dict(served)}")
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
                     "ray_actor_options": {"num_cpus": 2}, "max_constructor_retry_count": 3}
    scaling = RayOptions(autoscale_min=1, autoscale_max=4, replicas=2).deployment_options(settings, "cuda", None)
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                             "initial_replicas": 2}
    assert scaling["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1} and "num_replicas" not in scaling
    target = RayOptions(autoscale_max=2, target_ongoing_requests=3).deployment_options(settings, "cpu", None)
    assert target["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3}


@pytest.mark.parametrize("flags, message", [
    ({"replicas": 0}, "--replicas must be at least 1"),
    ({"autoscale_min": 2}, "needs --autoscale-max"),
    ({"autoscale_min": 3, "autoscale_max": 2}, "autoscale-min <= --autoscale-max"),
    ({"autoscale_min": 0, "autoscale_max": 0}, "--autoscale-max >= 1"),
    ({"autoscale_min": 1, "autoscale_max": 2, "replicas": 5}, "outside"),
    ({"target_ongoing_requests": 4}, "give --autoscale-max too"),
    ({"autoscale_max": 2, "target_ongoing_requests": 0}, "more than 0"),
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

    async def replica_header():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return (await c.get("/health")).headers[REPLICA]

    assert asyncio.run(replica_header()) == "r1"
