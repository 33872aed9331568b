"""cluster/: the launcher YAML passes Ray's own autoscaler schema, the KubeRay manifests carry what the
controller needs, the working-dir upload stays small, and the Grafana dashboard reads only metrics the code
emits (and all of them)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import zipfile

import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = os.path.join(ROOT, "cluster")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _load(*parts: str):
    with open(os.path.join(CLUSTER, *parts)) as f:
        return yaml.safe_load(f)


def _no_keys(path: str) -> None:
    text = open(path).read()
    for key in (*SECRETS, "aws_access_key_id", "aws_secret_access_key"):
        assert key not in text, f"{path} names {key}: S3 access comes from IAM roles"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path} holds what looks like an access key id"


# ---- AWS cluster launcher ----


def test_aws_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("aws.yaml")
    with pytest.raises(
        RuntimeError, match="cluster_synced_files"
    ):  # the raw file is not the launcher's input
        validate_config(raw)
    cfg = prepare_config(raw)
    validate_config(cfg)

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]
    gpus = {t["node_config"]["InstanceType"]: t["resources"].get("GPU", 0) for t in workers.values()}
    assert gpus["p5.48xlarge"] == 8 and 1 in gpus.values()
    assert all(t["min_workers"] == 0 for t in workers.values() if t["resources"].get("GPU")), (
        "GPU workers scale from zero"
    )


def test_aws_launcher_uses_roles_image_and_token_auth():
    cfg = _load("aws.yaml")
    _no_keys(os.path.join(CLUSTER, "aws.yaml"))
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # no per-node installs: the image holds everything (Ray's defaults would pip-install a nightly wheel)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert cfg[key] == [], key
    assert "facesynth" in cfg["docker"]["image"]
    # token auth on every node: the container env of all nodes, and the token file synced to all of them
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "--metrics-export-port=8080" in start, key
    assert "--head" in " ".join(cfg["head_start_ray_commands"])


# ---- KubeRay ----


def _kuberay_docs() -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(CLUSTER, "kuberay", "*.yaml"))):
        _no_keys(path)
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: the image's Ray must be the submitting client's"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["autoscalerOptions"]["version"] == "v2", where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams are a string map"
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head runs no work"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), where
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names), f"{where}: DNS-1123 names"
    gpu_groups = 0
    for template in [head["template"], *(g["template"] for g in groups)]:
        assert template["spec"]["serviceAccountName"] == "facesynth", f"{where}: S3 through the IRSA account"
        for c in _containers(template):
            assert "facesynth" in c["image"], where
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), f"{where}: {c['name']} needs cpu/memory limits"
            names_in_env = {e["name"] for e in c.get("env", [])}
            assert not names_in_env & set(SECRETS), f"{where}: AWS keys in a container env"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        gpu = [c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(g["template"])]
        if any(gpu):
            gpu_groups += 1
            assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, f"{g['groupName']}: scales 0..N"
            assert all(isinstance(n, str) and int(n) >= 1 for n in gpu), g["groupName"]
    assert gpu_groups >= 1, f"{where}: no GPU worker group"


def test_kuberay_manifests_have_what_the_controller_needs():
    docs = _kuberay_docs()
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayCluster", "RayJob", "ServiceAccount"}
    for d in docs:
        assert d["apiVersion"] == ("v1" if d["kind"] == "ServiceAccount" else "ray.io/v1")
        assert d["metadata"]["name"]
    sa = kinds["ServiceAccount"]
    assert sa["metadata"]["name"] == "facesynth"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    _check_cluster_spec(kinds["RayCluster"]["spec"], "RayCluster")
    _check_cluster_spec(kinds["RayJob"]["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec")
    gpus = {
        g["groupName"]: c["resources"]["limits"].get("nvidia.com/gpu")
        for g in kinds["RayCluster"]["spec"]["workerGroupSpecs"]
        for c in _containers(g["template"])
    }
    assert {"1", "8"} <= set(gpus.values()), gpus


def test_rayjob_entrypoint_is_a_valid_job_run():
    from facesynth.config import load_config
    from facesynth.registry import job as registered_job

    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    assert job["submissionMode"] in ("K8sJobMode", "HTTPMode")
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.generate"], argv
    assert argv[3] == "--config"
    # the preset and overrides validate as the job's own command line would take them
    cfg = load_config(registered_job("generate").config_class(), argv[4], argv[5:])
    assert cfg.output.startswith("s3://") and cfg.generator.model.uri.startswith("s3://")
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert not set(env) & set(SECRETS)


# ---- image, local cluster, upload ----


def test_dockerfile_keeps_the_images_torch_and_installs_the_extras():
    text = open(os.path.join(CLUSTER, "docker", "Dockerfile")).read()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\S*cuda\S*", text, re.M)
    assert '-e ".[sd,deepspeed]"' in text and "-c /tmp/keep-torch.txt" in text
    import ray

    assert f"ARG RAY_VERSION={ray.__version__}" in text
    _no_keys(os.path.join(CLUSTER, "docker", "Dockerfile"))


def test_local_script_is_valid_bash_and_stops_only_its_own_processes():
    path = os.path.join(CLUSTER, "local.sh")
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert "RAY_AUTH_MODE=token" in text and "--metrics-export-port" in text and "--num-gpus" in text
    assert not re.search(r"^\s*ray stop", text, re.M), "ray stop would stop every Ray on the machine"
    out = subprocess.run(["bash", path], capture_output=True, text=True)
    assert out.returncode == 2 and "start|stop" in out.stderr


def test_working_dir_upload_is_small(tmp_path):
    """The zip Ray builds for ``--working-dir .`` (its own packaging, honouring .rayignore and .gitignore)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    pkg = tmp_path / "pkg.zip"
    create_package(ROOT, pkg, include_gitignore=True)
    names = zipfile.ZipFile(pkg).namelist()
    size = pkg.stat().st_size
    print(
        f"working-dir upload: {size / 2**20:.2f} MiB, {len(names)} files (Ray's limit {GCS_STORAGE_MAX_SIZE / 2**20:.0f} MiB)"
    )
    assert size < 8 * 2**20 and size < GCS_STORAGE_MAX_SIZE / 50
    tops = {n.split("/")[0] for n in names}
    assert {"facesynth", "synthgen", "recog", "jobs", "configs", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", ".gpu", "out", "data", "facesynth.egg-info"}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".parquet", ".pt", ".bin"))]


def test_rayignore_keeps_data_out_even_without_gitignore(tmp_path):
    """.rayignore alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) still keeps venvs, outputs and data out."""
    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    for rel in ("jobs/render.py", ".venv/lib/x.py", "out/run/part.parquet", "data/a.bin", ".git/HEAD",
                "facesynth/data/keep.py", "recog/__pycache__/m.pyc", "w/model.safetensors"):  # fmt: skip
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    (repo / ".rayignore").write_text(open(os.path.join(ROOT, ".rayignore")).read())
    pkg = tmp_path / "pkg.zip"
    create_package(str(repo), pkg, include_gitignore=False)
    files = sorted(n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/"))
    assert files == [".rayignore", "facesynth/data/keep.py", "jobs/render.py"]


# ---- Grafana ----

CODE_DIRS = ("facesynth", "synthgen", "recog", "jobs", "tune")


def emitted_metrics() -> dict[str, str]:
    """Metric names the code emits through facesynth.telemetry: {name: 'counter' | 'gauge'}."""
    found = {}
    call = re.compile(r"telemetry\.(inc|set_gauge)\(\s*\"([a-z0-9_]+)\"")
    for d in CODE_DIRS:
        for path in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True):
            for kind, name in call.findall(open(path).read()):
                found[name] = "counter" if kind == "inc" else "gauge"
    return found


def test_grafana_dashboard_reads_exactly_the_emitted_metrics():
    with open(os.path.join(CLUSTER, "grafana", "facesynth.json")) as f:
        dash = json.load(f)
    assert dash["schemaVersion"] == 27 and dash["uid"] == "facesynth"
    emitted = emitted_metrics()
    assert {
        "facesynth_images_generated",
        "facesynth_shards_committed",
        "facesynth_train_images_per_s",
    } <= set(emitted)
    used = set()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(p["type"] in ("graph", "row") for p in dash["panels"])
    for expr in exprs:
        names = re.findall(r"\b(ray_[a-z0-9_]+)\s*[{\[(]", expr)
        assert names, expr
        for exported in names:
            # Ray exports a metric as ray_<name>; a Counter only as ray_<name>_total
            name = exported.removeprefix("ray_")
            if emitted.get(name.removesuffix("_total")) == "counter":
                assert name.endswith("_total"), f"{exported}: counters export as ray_<name>_total"
                name = name.removesuffix("_total")
            assert emitted.get(name), f"{exported} in {expr!r} is not emitted by the code"
            used.add(name)
    assert used == set(emitted), f"metrics emitted but not on the dashboard: {set(emitted) - used}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
