"""deploy/kubernetes/ stays valid and in step with the code, checked offline.

Every manifest is validated against the Kubernetes JSON schemas that kubernetes-validate
ships (no cluster, no network), and every container of the project's image is checked
as `segments` would check it before starting: its arguments parse with the CLI, and its
SEGMENTS_* variables (from the ConfigMap, the Secret and `env`) pass ``load_settings``
and ``config_errors`` for its subcommand (as tests/unit/test_compose.py does for
docker-compose.yml).  Then the deployment's own rules: probes, the migrations' order,
the disruption budget, services, security context and resources.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from service.cli import COMMANDS, build_parser, config_errors
from service.settings import ENV_PREFIX, Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
IMAGE = "user-segments"
# The oldest Kubernetes minor these manifests are meant for, and the newest schemas the
# library ships.
VERSIONS = ("1.30.0", latest_version())
# Stands in for a value Kubernetes fills in at run time (a fieldRef, a key of an object
# that is not in these manifests): only its presence is checked.
PLACEHOLDER = "set-by-kubernetes"
WAIT_FOR_MIGRATIONS = "wait-for-migrations"

Doc = dict[str, Any]


def _load() -> list[Doc]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                doc.setdefault("metadata", {})["annotations"] = {
                    **doc["metadata"].get("annotations", {}),
                    "test/file": path.name,
                }
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[Doc]:
    docs = _load()
    assert docs, f"no manifests in {DEPLOY}"
    return docs


def _where(doc: Doc) -> str:
    return f"{doc['metadata']['annotations']['test/file']}: {doc['kind']} {doc['metadata']['name']}"


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def _pod(doc: Doc) -> Doc:
    pod: Doc = doc["spec"]["template"]["spec"]
    return pod


def _containers(doc: Doc) -> Iterator[tuple[str, Doc]]:
    pod = _pod(doc)
    for c in pod.get("initContainers", []):
        yield "init", c
    for c in pod["containers"]:
        yield "main", c


def _is_project(container: Doc) -> bool:
    return bool(
        re.fullmatch(rf"(.*/)?{IMAGE}(:[\w.-]+)?(@sha256:[0-9a-f]{{64}})?", container["image"])
    )


# --- 1. The Kubernetes schemas -------------------------------------------------------------


def _strip_test_annotation(doc: Doc) -> Doc:
    clean = copy.deepcopy(doc)
    annotations = clean["metadata"]["annotations"]
    annotations.pop("test/file", None)
    if not annotations:
        del clean["metadata"]["annotations"]
    return clean


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    manifests: list[Doc], version: str
) -> None:
    errors = []
    for doc in manifests:
        try:
            kubernetes_validate.validate(_strip_test_annotation(doc), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{_where(doc)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{_where(doc)}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert [i["name"] for i in kustomization["images"]] == [IMAGE]


# --- 2. Commands and settings, as `segments` checks them ------------------------------------


def _objects(docs: list[Doc], kind: str) -> dict[str, dict[str, str]]:
    """ConfigMaps' or Secrets' keys and values, by name."""
    found: dict[str, dict[str, str]] = {}
    for doc in _of_kind(docs, kind):
        values = {k: str(v) for k, v in (doc.get("data") or {}).items()}
        if kind == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in values.items()}
            values |= {k: str(v) for k, v in (doc.get("stringData") or {}).items()}
        found[doc["metadata"]["name"]] = values
    return found


def _environment(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes would build it (``env`` wins)."""
    sources = {"ConfigMap": _objects(docs, "ConfigMap"), "Secret": _objects(docs, "Secret")}
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        kind, key = (
            ("ConfigMap", "configMapRef") if "configMapRef" in ref else ("Secret", "secretRef")
        )
        name = ref[key]["name"]
        if name not in sources[kind]:
            pytest.fail(f"{container['name']}: envFrom names a {kind} {name} that is not here")
        prefix = ref.get("prefix", "")
        env |= {prefix + k: v for k, v in sources[kind][name].items()}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        value_from = item.get("valueFrom", {})
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in value_from:
                ref = value_from[key]
                env[item["name"]] = sources[kind].get(ref["name"], {}).get(ref["key"], PLACEHOLDER)
                break
        else:
            env[item["name"]] = PLACEHOLDER
    return env


def _segments_argv(where: str, container: Doc) -> list[str]:
    """The arguments `segments` gets: the image's entrypoint is `segments`."""
    command = container.get("command")
    args = [str(a) for a in container.get("args", [])]
    if command is None:
        return args
    if [Path(command[0]).name, *command[1:]] == ["segments"]:
        return args
    pytest.fail(f"{where}: runs {shlex.join(command)}, not the image's `segments` entrypoint")


def _check_command(where: str, argv: list[str]) -> argparse.Namespace:
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit:
        reason = usage.getvalue().strip().splitlines()[-1:] or ["exits"]
        pytest.fail(f"{where}: `segments {shlex.join(argv)}`: {reason[0]}")


def _check_settings(where: str, env: dict[str, str], subcommand: str) -> Settings:
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    try:
        settings = load_settings(ours)
    except ValueError as exc:
        pytest.fail(f"{where}: {exc}")
    # The same check `segments <subcommand>` runs before starting (exit 2 otherwise).
    errors = config_errors(settings, subcommand)
    if errors:
        pytest.fail(f"{where}: {'; '.join(errors)}")
    return settings


def _is_wait_for_migrations(role: str, container: Doc) -> bool:
    return role == "init" and container["name"] == WAIT_FOR_MIGRATIONS


def _check_wait_for_migrations(where: str, container: Doc) -> None:
    script = " ".join(container.get("command", []) + container.get("args", []))
    if not ("alembic" in script and "current" in script and "(head)" in script):
        pytest.fail(f"{where}: does not wait for `alembic current` to report the head")
    if "/app/alembic.ini" not in script:
        pytest.fail(f"{where}: names no /app/alembic.ini (the image's)")


def _check_containers(docs: list[Doc]) -> dict[str, tuple[argparse.Namespace, Settings]]:
    """Every project container: its command parses and its settings pass.  Returns the
    main containers' parsed arguments and settings, by workload name."""
    found = {}
    seen_variables = 0
    for doc in _workloads(docs):
        for role, container in _containers(doc):
            where = f"{_where(doc)}: container {container['name']}"
            if not _is_project(container):
                continue
            env = _environment(docs, container)
            seen_variables += sum(1 for k in env if k.startswith(ENV_PREFIX))
            if _is_wait_for_migrations(role, container):
                _check_wait_for_migrations(where, container)
                _check_settings(where, env, "migrate")  # it reads SEGMENTS_DATABASE_URL
                continue
            argv = _segments_argv(where, container)
            if not argv or argv[0] not in COMMANDS:
                pytest.fail(f"{where}: `segments {shlex.join(argv)}` is not a subcommand")
            args = _check_command(where, argv)
            settings = _check_settings(where, env, argv[0])
            if role == "main":
                found[doc["metadata"]["name"]] = (args, settings)
    if not seen_variables:
        pytest.fail(f"no {ENV_PREFIX}* variable found")
    return found


def test_commands_parse_and_settings_pass(manifests: list[Doc]) -> None:
    found = _check_containers(manifests)
    subcommands = {name: args.command for name, (args, _) in found.items()}
    assert subcommands == {
        "segments-migrate": "migrate",
        "segments-api": "serve",
        "segments-consumer": "consume",
        "segments-reconciler": "reconcile",
    }


# --- 3. The deployment's own rules -------------------------------------------------------------


def _port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    return None


def _check_probes(docs: list[Doc]) -> None:
    found = _check_containers(docs)
    for doc in _of_kind(docs, "Deployment"):
        args, settings = found[doc["metadata"]["name"]]
        container = _pod(doc)["containers"][0]
        where = f"{_where(doc)}: container {container['name']}"
        liveness, readiness = container.get("livenessProbe"), container.get("readinessProbe")
        if not liveness:
            pytest.fail(f"{where}: no liveness probe")
        if args.command == "serve":
            listens = args.port or settings.http_port
            probes = {"liveness": (liveness, "/healthz"), "readiness": (readiness, "/readyz")}
            for kind, (probe, path) in probes.items():
                get = (probe or {}).get("httpGet")
                if not get or get.get("path") != path:
                    pytest.fail(f"{where}: the {kind} probe must ask {path}")
                port = _port_number(container, get["port"])
                if port != listens:
                    pytest.fail(f"{where}: the {kind} probe asks port {port}, the API {listens}")
            # /readyz runs up to three checks of SEGMENTS_PROBE_TIMEOUT_S one after the other.
            if readiness.get("timeoutSeconds", 1) < 3 * settings.probe_timeout_s + 0.5:
                pytest.fail(f"{where}: the readiness probe's timeout is shorter than /readyz's")
        else:
            get = liveness.get("httpGet") or {}
            port = _port_number(container, get.get("port", 0))
            if not settings.metrics_port or port != settings.metrics_port:
                pytest.fail(
                    f"{where}: the liveness probe asks port {port}, the metrics endpoint "
                    f"is on {settings.metrics_port}"
                )


def _check_migrations_first(docs: list[Doc]) -> None:
    jobs = [
        d for d in _of_kind(docs, "Job")
        if _segments_argv("job", _pod(d)["containers"][0])[:1] == ["migrate"]
    ]  # fmt: skip
    if len(jobs) != 1:
        pytest.fail(f"one migration Job expected, found {len(jobs)}")
    job = jobs[0]
    if job["spec"].get("parallelism", 1) != 1 or _pod(job).get("restartPolicy") not in (
        "Never",
        "OnFailure",
    ):
        pytest.fail(f"{_where(job)}: one migrator at a time, and it must not restart forever")
    for doc in _of_kind(docs, "Deployment"):
        names = [c["name"] for c in _pod(doc).get("initContainers", [])]
        if WAIT_FOR_MIGRATIONS not in names:
            pytest.fail(f"{_where(doc)}: starts without waiting for the migrations")


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _check_services_and_budget(docs: list[Doc]) -> None:
    deployments = _of_kind(docs, "Deployment")
    for svc in _of_kind(docs, "Service"):
        targets = [
            d for d in deployments
            if _labels_match(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]  # fmt: skip
        if len(targets) != 1:
            pytest.fail(f"{_where(svc)}: selects {len(targets)} Deployments")
        container = _pod(targets[0])["containers"][0]
        for port in svc["spec"]["ports"]:
            if _port_number(container, port.get("targetPort", port["port"])) is None:
                pytest.fail(f"{_where(svc)}: targetPort {port.get('targetPort')} is not exposed")
    api = [d for d in deployments if _pod(d)["containers"][0].get("args", [""])[0] == "serve"]
    budgets = _of_kind(docs, "PodDisruptionBudget")
    for doc in api:
        labels = doc["spec"]["template"]["metadata"]["labels"]
        covering = [
            b for b in budgets if _labels_match(b["spec"]["selector"]["matchLabels"], labels)
        ]
        if len(covering) != 1:
            pytest.fail(f"{_where(doc)}: {len(covering)} PodDisruptionBudgets cover the API")
        spec, replicas = covering[0]["spec"], doc["spec"].get("replicas", 1)
        if replicas < 2:
            pytest.fail(f"{_where(doc)}: one replica: every disruption is an outage")
        if spec.get("maxUnavailable", 0) in (0, "0%") and spec.get("minAvailable", 0) in (
            replicas,
            "100%",
        ):
            pytest.fail(f"{_where(covering[0])}: blocks every drain")
        if "maxUnavailable" not in spec and "minAvailable" not in spec:
            pytest.fail(f"{_where(covering[0])}: no budget set")


def _check_security_and_resources(docs: list[Doc]) -> None:
    for doc in _workloads(docs):
        pod = _pod(doc)
        pod_security = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            pytest.fail(f"{_where(doc)}: mounts a Kubernetes API token it never uses")
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for _, container in _containers(doc):
            where = f"{_where(doc)}: container {container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 1) == 0:
                pytest.fail(f"{where}: may run as root")
            if security.get("allowPrivilegeEscalation") is not False:
                pytest.fail(f"{where}: allows privilege escalation")
            if security.get("readOnlyRootFilesystem") is not True:
                pytest.fail(f"{where}: the root filesystem is writable")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                pytest.fail(f"{where}: keeps Linux capabilities")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(kind, {}))
                if missing:
                    pytest.fail(f"{where}: no {kind} for {', '.join(sorted(missing))}")
            # What the processes write (the metrics directory of `serve --workers N`,
            # tempfile) goes to /tmp: an emptyDir, the root filesystem being read-only.
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if _is_project(container) and mounts.get("/tmp") not in tmp_volumes:
                pytest.fail(f"{where}: /tmp is not a writable emptyDir")


def _check_all(docs: list[Doc]) -> None:
    _check_containers(docs)
    _check_probes(docs)
    _check_migrations_first(docs)
    _check_services_and_budget(docs)
    _check_security_and_resources(docs)


def test_probes(manifests: list[Doc]) -> None:
    _check_probes(manifests)


def test_migrations_run_first(manifests: list[Doc]) -> None:
    _check_migrations_first(manifests)


def test_services_and_disruption_budget(manifests: list[Doc]) -> None:
    _check_services_and_budget(manifests)


def test_non_root_read_only_and_bounded(manifests: list[Doc]) -> None:
    _check_security_and_resources(manifests)


# --- 4. Each check fails on the drift it exists for (on a changed copy) -----------------------


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _main(docs: list[Doc], name: str) -> Doc:
    container: Doc = _pod(_find(docs, "Deployment", name))["containers"][0]
    return container


def _set_env(docs: list[Doc], workload: str, name: str, value: str) -> None:
    _main(docs, workload).setdefault("env", []).append({"name": name, "value": value})


def _config(docs: list[Doc]) -> Doc:
    data: Doc = _find(docs, "ConfigMap", "segments-config")["data"]
    return data


def _secret(docs: list[Doc]) -> Doc:
    data: Doc = _find(docs, "Secret", "segments-secrets")["stringData"]
    return data


def _api(docs: list[Doc]) -> Doc:
    return _main(docs, "segments-api")


def _deployment(docs: list[Doc], name: str) -> Doc:
    return _find(docs, "Deployment", name)


def _job_pod(docs: list[Doc]) -> Doc:
    return _pod(_find(docs, "Job", "segments-migrate"))


DRIFT: list[tuple[Callable[[list[Doc]], Any], str]] = [
    (lambda d: _api(d).update(args=["serve", "--wrokers", "2"]), "unrecognized"),
    (lambda d: _api(d).update(args=["serve", "--workers", "two"]), "invalid int"),
    (lambda d: _main(d, "segments-consumer").update(args=["consumer"]), "not a subcommand"),
    (lambda d: _api(d).update(command=["python", "-m", "x"]), "entrypoint"),
    (lambda d: _secret(d).update(SEGMENTS_AUTH_TOKENS="{no"), "AUTH_TOKENS"),
    (lambda d: _config(d).pop("SEGMENTS_KAFKA_BOOTSTRAP"), "KAFKA_BOOTSTRAP"),
    (lambda d: _secret(d).pop("SEGMENTS_DATABASE_URL"), "DATABASE_URL"),
    (lambda d: _config(d).update(SEGMENTS_NO_SUCH="1"), "unknown setting"),
    (lambda d: _config(d).update(SEGMENTS_HTTP_PORT="http"), "invalid setting"),
    (lambda d: _set_env(d, "segments-api", "SEGMENTS_PROBE_TIMEOUT_S", "0"), "PROBE_TIMEOUT"),
    (lambda d: _api(d)["envFrom"][0]["configMapRef"].update(name="x"), "not here"),
    (lambda d: _config(d).update(SEGMENTS_HTTP_PORT="8081"), "port 8080, the API 8081"),
    (lambda d: _api(d)["readinessProbe"]["httpGet"].update(path="/healthz"), "/readyz"),
    (lambda d: _api(d).pop("livenessProbe"), "no liveness"),
    (lambda d: _api(d)["readinessProbe"].update(timeoutSeconds=1), "timeout"),
    (lambda d: _config(d).update(SEGMENTS_METRICS_PORT="9200"), "metrics endpoint is on 9200"),
    (
        lambda d: _pod(_deployment(d, "segments-reconciler")).pop("initContainers"),
        "waiting for the migrations",
    ),
    (lambda d: d.remove(_find(d, "Job", "segments-migrate")), "one migration Job"),
    (lambda d: _deployment(d, "segments-api")["spec"].update(replicas=1), "one replica"),
    (
        lambda d: d.remove(_find(d, "PodDisruptionBudget", "segments-api")),
        "0 PodDisruptionBudgets",
    ),
    (
        lambda d: _find(d, "Service", "segments-api")["spec"]["ports"][0].update(targetPort="web"),
        "not exposed",
    ),
    (
        lambda d: _main(d, "segments-consumer")["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "writable",
    ),
    (lambda d: _job_pod(d)["securityContext"].update(runAsNonRoot=False), "as root"),
    (lambda d: _main(d, "segments-reconciler")["resources"].pop("limits"), "no limits"),
    (lambda d: _api(d).pop("volumeMounts"), "/tmp"),
]


@pytest.mark.parametrize(("change", "error"), DRIFT)
def test_checks_catch_drift(
    manifests: list[Doc], change: Callable[[list[Doc]], Any], error: str
) -> None:
    changed = copy.deepcopy(manifests)
    _check_all(changed)  # the files themselves pass
    change(changed)
    with pytest.raises(pytest.fail.Exception, match=re.escape(error)):
        _check_all(changed)


def test_schema_validation_catches_drift(manifests: list[Doc]) -> None:
    changed = _strip_test_annotation(_find(copy.deepcopy(manifests), "Deployment", "segments-api"))
    _pod(changed)["containers"][0]["livenessProbe"]["httpGet"]["port"] = ["http"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(changed, VERSIONS[-1], strict=True)
    changed = _strip_test_annotation(_find(copy.deepcopy(manifests), "Deployment", "segments-api"))
    _pod(changed)["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # a typo: strict
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(changed, VERSIONS[-1], strict=True)
