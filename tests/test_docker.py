"""docker/: the image, the cluster launcher config and the KubeRay RayJob parse, name the Ray
version pyproject.toml pins, run the 4-GPU DML cohort, write the run directory where every
node reaches it, and keep token authentication on without a token (or a cloud key) written
anywhere; the Grafana dashboard queries only the metrics cohort exports."""
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def ray_pin() -> str:
    """The Ray version the project is tested on: the Makefile's RAY_PIN, which the range
    pyproject.toml accepts must include (or pyproject.toml's own exact pin)."""
    from packaging.specifiers import SpecifierSet
    specs = re.findall(r'"ray\[[^\]]*\]([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(specs) == 1, "pyproject.toml must name ray[...] exactly once"
    pins = re.findall(r"^RAY_PIN\s*:?=\s*'?ray\[[^\]]*\]==([0-9][0-9.]*)",
                      (ROOT / "Makefile").read_text(), re.M)
    pins = pins or re.findall(r"^==([0-9][0-9.]*)$", specs[0])
    assert len(pins) == 1, "the Makefile's RAY_PIN (or pyproject.toml) must pin ray[...]==X.Y.Z once"
    assert pins[0] in SpecifierSet(specs[0]), (pins[0], specs[0])
    return pins[0]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def from_images(path: Path, **build_args) -> list[str]:
    """FROM images with ARG defaults (declared before the first FROM) and build args applied."""
    args, images = {}, []
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and not images:
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default.strip('"'))
        elif word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image))
    return images


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rayjob() -> dict:
    jobs = [d for d in load_yaml_docs(DOCKER / "rayjob.yaml") if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def pod_specs(job: dict) -> list[tuple[dict, int]]:
    """(pod spec, replicas) of the head and every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    out = [(cluster["headGroupSpec"]["template"]["spec"], 1)]
    out += [(g["template"]["spec"], g["replicas"]) for g in cluster["workerGroupSpecs"]]
    return out


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# ---- the image ---------------------------------------------------------------------------------
def test_dockerfile_builds_on_the_official_ray_image_of_the_pinned_version():
    pin = ray_pin()
    assert pin == "2.60.0"
    assert from_images(DOCKER / "Dockerfile") == [f"rayproject/ray:{pin}-py311-cpu"]
    assert from_images(DOCKER / "Dockerfile", RAY_PLATFORM="gpu") == [f"rayproject/ray:{pin}-py311-gpu"]
    assert from_images(DOCKER / "Dockerfile", RAY_PLATFORM="cu128") == [f"rayproject/ray:{pin}-py311-cu128"]


def test_dockerfile_installs_the_project_and_keeps_token_auth_on():
    steps = dockerfile_instructions(DOCKER / "Dockerfile")
    words = [w for w, _ in steps]
    assert set(words) <= {"ARG", "FROM", "RUN", "COPY", "WORKDIR", "ENV", "CMD", "USER", "LABEL"}
    copies = [rest.split() for w, rest in steps if w == "COPY"]
    for parts in copies:   # every COPY source exists in the build context (the repository root)
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        assert sources and all((ROOT / s).exists() for s in sources), parts
    runs = " ".join(rest for w, rest in steps if w == "RUN")
    assert "pip install --no-cache-dir -e ." in runs and "torch==" in runs
    env = " ".join(rest for w, rest in steps if w == "ENV")
    assert "RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN" not in env
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**" and "!cohort/**" in ignore and "!jobs/**" in ignore   # only the sources


# ---- the cluster launcher ------------------------------------------------------------------------
def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    validate_config(config)                   # Ray's own schema (ray-schema.json)
    validate_config(prepare_config(config))   # and merged with the provider's defaults
    pin = ray_pin()
    images = [config["docker"][k] for k in ("image", "head_image", "worker_image") if k in config["docker"]]
    assert images and all(i.startswith(f"rayproject/ray:{pin}-") for i in images), images
    gpus = {name: t["resources"].get("GPU", 0) for name, t in config["available_node_types"].items()}
    assert gpus[config["head_node_type"]] == 0 and sum(
        gpus[n] * config["available_node_types"][n].get("max_workers", 0) for n in gpus) >= 4


def test_cluster_yaml_keeps_the_cluster_closed():
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in (DOCKER / "cluster.yaml").read_text()
    mounts = config["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"   # the token is a file


def test_cluster_yaml_lets_every_node_write_the_run_directory():
    """Ray Train workers upload their own checkpoints: every node type may write the S3 run
    directory through an instance profile (the head gets Ray's default one, which has S3
    access, unless it names its own), and every container knows the bucket's region."""
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert node_type["node_config"].get("IamInstanceProfile"), name
    region = config["provider"]["region"]
    assert f"--env AWS_DEFAULT_REGION={region}" in config["docker"]["run_options"]
    text = (DOCKER / "cluster.yaml").read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text   # no keys


# ---- the RayJob ------------------------------------------------------------------------------------
RAYJOB_SPEC_FIELDS = {   # KubeRay v1 RayJobSpec (ray-operator/apis/ray/v1/rayjob_types.go)
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}


def test_rayjob_runs_the_dml_job_on_four_gpu_workers():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/dml.py")
    assert argv[argv.index("--students") + 1] == "4"
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    total = 0
    for pod, replicas in pod_specs(job):
        for container in pod["containers"]:
            assert ray_pin() in container["image"].rsplit(":", 1)[1], container["image"]
            gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            total += gpus * replicas
    assert total == 4
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4


def ray_containers(job: dict) -> list[dict]:
    return [c for pod, _ in pod_specs(job) for c in pod["containers"]]


def test_rayjob_writes_the_run_directory_where_every_pod_reaches_it():
    """--output is a URI the project opens as remote storage, and every Ray container (the
    head's driver, the workers' Ray Train uploads) gets the S3 credentials from one Secret; or
    else --output lies on a ReadWriteMany volume that every pod mounts."""
    from cohort.storage import is_remote, location
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    output = argv[argv.index("--output") + 1]
    if is_remote(location(output)):
        assert output.startswith("s3://") and "region=" in output   # no region lookup at start
        for container in ray_containers(job):
            env = {e["name"]: e for e in container.get("env", [])}
            refs = {env[k]["valueFrom"]["secretKeyRef"]["name"]
                    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
            assert len(refs) == 1, (container["name"], refs)
    else:
        claims = {d["metadata"]["name"]: d for d in load_yaml_docs(DOCKER / "rayjob.yaml")
                  if d.get("kind") == "PersistentVolumeClaim"}
        for pod, _ in pod_specs(job):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounted = [(m["mountPath"], volumes[m["name"]]) for c in pod["containers"]
                       for m in c.get("volumeMounts", [])]
            shared = [v for path, v in mounted if output.startswith(path.rstrip("/") + "/")
                      and "ReadWriteMany" in claims[v["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]]
            assert shared, f"a pod does not mount {output} from a ReadWriteMany volume"


def test_rayjob_has_token_auth_from_a_secret():
    job = rayjob()
    auth = job["spec"]["rayClusterSpec"].get("authOptions", {})
    envs = {e["name"]: e for pod, _ in pod_specs(job) for c in pod["containers"] for e in c.get("env", [])}
    if auth:
        assert auth["mode"] == "token" and auth.get("secretName")
    else:
        assert envs["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in envs["RAY_AUTH_TOKEN"]["valueFrom"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"   # the dashboard is not exposed


# ---- no token anywhere -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile", "cluster.yaml", "rayjob.yaml", "README.md",
                                  "grafana/cohort.json"])
def test_no_token_literal(name):
    text = (DOCKER / name).read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)                   # no AWS key id
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*(?![.$])\S", text)   # nor its secret
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)          # no token-like hex string
    assert "--from-literal" not in text
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)\S", text)      # never RAY_AUTH_TOKEN=value
    assert not re.search(r"--auth-token|--token[ =]", text)
    if name.endswith(".yaml"):
        for doc in load_yaml_docs(DOCKER / name):
            assert doc.get("kind") != "Secret", "Secrets are created from a file, not committed"
            for node in walk(doc):
                if isinstance(node, dict) and re.search(r"TOKEN|SECRET|PASSWORD", str(node.get("name", ""))):
                    assert "value" not in node, node   # env vars with secrets come from valueFrom


def test_readme_covers_each_piece():
    text = (DOCKER / "README.md").read_text()
    for needle in ("docker build -f docker/Dockerfile", "ray up docker/cluster.yaml",
                   "ray dashboard docker/cluster.yaml", "kubectl apply -f docker/rayjob.yaml",
                   "tensorboard --logdir", "cohort report", "RAY_AUTH_MODE=token", "--output s3://",
                   "ray metrics launch-prometheus", "docker/grafana/cohort.json"):
        assert needle in text, needle


# ---- the Grafana dashboard ------------------------------------------------------------------------
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version"}   # Ray adds these
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset"}


def exported_metrics(monkeypatch) -> tuple[set[str], set[str]]:
    """(metric names as Prometheus sees them, their label names), from telemetry.py's own code:
    every gauge it can set, made through a stand-in for ray.util.metrics.Gauge. Ray prefixes
    an application metric's name with `ray_` and adds labels of its own."""
    from cohort.ray import telemetry
    made = {}

    class Recorder:
        def __init__(self, name, description="", tag_keys=()):
            self.name = name
            made[name] = set(tag_keys)

        def set(self, value, tags=None):
            assert set(tags) == made[self.name]   # every label the gauge declares, no other

    monkeypatch.setattr(telemetry, "Gauge", Recorder)
    monkeypatch.setattr(telemetry, "_registry", {})
    telemetry.Telemetry("run", "dml", "student0").set(**{name: 1.0 for name in telemetry.GAUGES})
    assert made, "telemetry.py made no gauge"
    return {f"ray_{name}" for name in made}, set().union(*made.values()) | RAY_LABELS


def promql_parts(query: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression (or a Grafana label_values(...) query)
    refers to."""
    labels = set()
    values = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    if values:
        query = values.group(1)
        labels.add(values.group(2))
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)                     # string literals
    for block in re.findall(r"\{([^}]*)\}", query):                       # label matchers
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", block))
    query = re.sub(r"\{[^}]*\}", " ", query)
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
        labels |= {word.strip() for word in group.split(",") if word.strip()}
    query = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", query)
    names = {m.group(1) for m in re.finditer(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", query)}
    return names - PROMQL_WORDS, labels


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "cohort.json").read_text())


def dashboard_queries(board: dict) -> list[str]:
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return queries


def test_promql_parts_reads_names_and_labels():
    assert promql_parts('max by (run, member) (ray_a{run=~"$run", x="{y}"}) / ray_b') == (
        {"ray_a", "ray_b"}, {"run", "member", "x"})
    assert promql_parts('label_values(ray_c{SessionName=~"$S"}, run)') == ({"ray_c"}, {"SessionName", "run"})


def test_every_dashboard_query_names_a_metric_cohort_exports(monkeypatch):
    metrics, labels = exported_metrics(monkeypatch)
    assert "ray_cohort_test_accuracy" in metrics
    queries = dashboard_queries(dashboard())
    assert queries
    for query in queries:
        names, used = promql_parts(query)
        assert names and names <= metrics, (query, names - metrics)
        assert used <= labels, (query, used - labels)


def test_dashboard_shows_each_member_next_to_rays_own():
    """Accuracy, loss, images/s and the exchange share, per member; on Ray's Prometheus data
    source (a template variable, as Ray's own dashboards have), with its own uid."""
    board = dashboard()
    panels = {p["title"]: p for p in board["panels"]}
    wanted = {"accuracy": {"ray_cohort_test_accuracy"}, "loss": {"ray_cohort_train_loss"},
              "images/s": {"ray_cohort_images_per_second"},
              "exchange share": {"ray_cohort_exchange_seconds", "ray_cohort_step_seconds"}}
    for word, metrics in wanted.items():
        (panel,) = [p for title, p in panels.items() if word in title.lower()]
        first = panel["targets"][0]["expr"]
        assert promql_parts(first)[0] == metrics and "member" in promql_parts(first)[1], first
        assert "{{member}}" in panel["targets"][0]["legendFormat"]
    share = next(p for t, p in panels.items() if "exchange share" in t.lower())["targets"][0]["expr"]
    assert share.index("ray_cohort_exchange_seconds") < share.index("/") < share.index("ray_cohort_step_seconds")
    sources = {var["name"]: var for var in board["templating"]["list"]}
    assert sources["datasource"]["type"] == "datasource" and sources["datasource"]["query"] == "prometheus"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"])
    assert board["uid"] and board["uid"] != "rayDefaultDashboard"
