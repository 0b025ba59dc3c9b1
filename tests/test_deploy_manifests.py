"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas, and they and the container
file run `lmforge serve` with flags it has, the way the README installs it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import typer
import typer.main
import yaml

from lmforge.cli import app

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
# The oldest Kubernetes the manifests are written for (autoscaling/v2, policy/v1 and sizeLimit are older)
# and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SERVE = typer.main.get_command(app).commands["serve"]


def manifests() -> dict[str, dict]:
    """{kind: the resource} for every YAML document under deploy/k8s/ (one of each kind)."""
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one resource of each kind"
    return by_kind


def serve_args(args: list[str]) -> dict:
    """The `lmforge serve` parameters these arguments give, parsed by the CLI's own parser
    (an unknown flag, a missing value or a bad number raises typer's usage error, a TyperException)."""
    with SERVE.make_context("serve", list(args)) as ctx:
        return ctx.params


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of a container file, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        lines.append(current)
        current = ""
    assert not current, "the file ends inside a continued line"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "") for ln in lines]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    assert set(manifests()) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                                "PodDisruptionBudget"}
    for kind, resource in manifests().items():
        kubernetes_validate.validate(resource, version, strict=True)  # raises on any error, unknown fields too


def test_the_validator_catches_a_broken_manifest():
    broken = manifests()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    broken = manifests()["HorizontalPodAutoscaler"]
    broken["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_the_deployment_runs_a_real_serve_command_safely():
    resources = manifests()
    deployment = resources["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    params = serve_args(container["args"])  # the image's entrypoint is `lmforge serve`
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    def volume_of(path: str) -> dict:
        mount = max((m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")), key=lambda m: len(m["mountPath"]))
        return volumes[mount["name"]]

    # On all addresses inside the pod, on purpose, with keys from the Secret mounted as a file.
    assert params["host"] == "0.0.0.0" and not params["allow_no_auth"]
    keys = volume_of(str(params["api_key_file"]))
    assert keys["secret"]["secretName"] == "lmforge-api-keys"
    assert [i["path"] for i in keys["secret"]["items"]] == [params["api_key_file"].name]
    assert volume_of(str(params["model"]))["persistentVolumeClaim"]["claimName"] == \
        resources["PersistentVolumeClaim"]["metadata"]["name"]
    assert "Secret" not in resources  # keys never live in the repository

    (port,) = container["ports"]
    assert port["containerPort"] == params["port"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert int(container["resources"]["requests"]["cpu"]) == params["threads"]
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e["value"] for e in container["env"]}
    writable = [p for p, m in mounts.items() if "emptyDir" in volumes[m["name"]]]
    assert env["LMFORGE_CACHE"] in writable and "/tmp" in writable  # the only places the server writes

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert resources["Service"]["spec"]["selector"].items() <= labels.items()
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert container["image"] == f"lmforge:{project_version()}"


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_a_flag_lmforge_serve_does_not_have_is_caught():
    with pytest.raises(typer.TyperException, match="No such option: --hots"):
        serve_args(["/models/model", "--hots", "0.0.0.0"])
    with pytest.raises(typer.TyperException, match="valid integer"):
        serve_args(["/models/model", "--port", "eighty"])


def run_commands(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The shell commands of the RUN lines, split at &&, as words."""
    return [shlex.split(cmd) for k, args in steps if k == "RUN" for cmd in args.split("&&")]


def test_the_container_file_installs_as_the_readme_and_serves_as_a_user():
    steps = instructions(CONTAINERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM"
    single = {k: args for k, args in steps if k in ("ENTRYPOINT", "CMD", "EXPOSE", "HEALTHCHECK", "ENV")}
    assert all(kinds.count(k) == 1 for k in single)

    # pip: torch first, pinned to the Makefile's version, from PyTorch's CPU index; then the package itself.
    makefile_torch = re.search(r"pip install -q (torch==[\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    pips = [c for c in run_commands(steps) if c[:2] == ["pip", "install"]]
    assert [a for c in pips for a in c if a.startswith("torch")] == [makefile_torch]
    torch_line = next(c for c in pips if makefile_torch in c)
    assert torch_line[torch_line.index("--index-url") + 1].endswith("/whl/cpu")
    assert pips.index(torch_line) < pips.index(next(c for c in pips if "." in c))

    users = [i for i, k in enumerate(kinds) if k == "USER"]
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("0", "root") and users[-1] < kinds.index("ENTRYPOINT")

    entrypoint, cmd = json.loads(single["ENTRYPOINT"]), json.loads(single["CMD"])
    assert entrypoint == ["lmforge", "serve"]
    params = serve_args(cmd)
    assert params["host"] == "0.0.0.0" and params["api_key_file"] is not None and not params["allow_no_auth"]
    assert single["EXPOSE"].split() == [str(params["port"])]
    assert f"http://127.0.0.1:{params['port']}/health" in single["HEALTHCHECK"]
    commands = typer.main.get_command(app).commands
    for words in run_commands(steps):  # an lmforge command run while building uses real flags too
        if words[0] == "lmforge":
            with commands[words[1]].make_context(words[1], words[2:]):
                pass

    # The Kubernetes Deployment relies on the image's entrypoint, runs as the image's user, and gives the
    # kernel cache the image uses a writable volume.
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container
    assert str(pod["securityContext"]["runAsUser"]) == user
    image_env = dict(pair.split("=", 1) for pair in shlex.split(single["ENV"]))
    assert {e["name"]: e["value"] for e in container["env"]}["LMFORGE_CACHE"] == image_env["LMFORGE_CACHE"]
