"""docker/: the image, the cluster launcher config and the KubeRay RayJob parse, name the Ray
version pyproject.toml pins, run the 4-GPU DML cohort, and keep token authentication on
without a token written anywhere."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', text)
    assert len(found) == 1, "pyproject.toml must pin ray[...]==X.Y.Z exactly once"
    return found[0]


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
@pytest.mark.parametrize("name", ["Dockerfile", "cluster.yaml", "rayjob.yaml", "README.md"])
def test_no_token_literal(name):
    text = (DOCKER / name).read_text()
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
                   "tensorboard --logdir", "cohort report", "RAY_AUTH_MODE=token"):
        assert needle in text, needle
