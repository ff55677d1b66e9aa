"""Paper scale survives its own run (issue 29): the MLflow server's secrets reach the head only and
log in to the database as its own role; the KubeRay manifests keep a 32-GPU trial's pods (EFA, no
eviction, an idle timeout), fence the head and write the data volume without fsGroup; the two
READMEs give one paper-scale command, which resolves to the trial the cost figures count; and a
sweep submitted with credentials in a --set keeps them out of the Ray job's entrypoint.

Static checks and small real runs (bash, PostgreSQL on a Unix socket, the CLI): no Ray cluster, no port."""
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conftest import REPO
from test_cluster import (CLUSTER, IMAGENET, LAUNCHERS, _containers, _launcher, _manifests,  # noqa: F401
                          _mlflow_server_args, _RecordingClient, recording_client)

SERVER_ENV = "~/.conmim/mlflow-server.env"
SECRET_NAME = "conmim/mlflow-server"


def _policy(role):
    return json.loads((CLUSTER / "aws-iam" / f"{role}-policy.json").read_text())


def _actions(policy):
    out = []
    for st in policy["Statement"]:
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        out += [(a, st) for a in acts]
    return out


# ---------------------------------------------------------------------------------------------
# 4. The MLflow server's secrets: on the head only, and a database role of its own
# ---------------------------------------------------------------------------------------------
def _every_node_commands(cfg):
    """What runs on (or is copied to) a worker node: Ray runs setup_commands +
    worker_setup_commands there, then worker_start_ray_commands; file_mounts go to every node."""
    cmds = cfg["initialization_commands"] + cfg["setup_commands"] + cfg["worker_setup_commands"] + \
        cfg["worker_start_ray_commands"]
    for t in cfg["available_node_types"].values():  # per-node-type overrides, if any
        cmds += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    return cmds


@pytest.mark.parametrize("name", LAUNCHERS)
def test_mlflow_server_secrets_reach_the_head_only(name):
    cfg = _launcher(name)
    mounts = " ".join(list(cfg["file_mounts"]) + list(cfg["file_mounts"].values()))
    assert "mlflow-server" not in mounts, cfg["file_mounts"]  # file_mounts go to every node
    assert "cluster_synced_files" not in cfg
    for cmd in _every_node_commands(cfg):
        assert "secretsmanager" not in cmd and "SecretId" not in cmd, cmd
        assert "mlflow-server.env" not in cmd or cmd.startswith(f"test ! -e {SERVER_ENV} ||"), cmd
    # the worker nodes refuse to run next to it (a copied config that put it back into file_mounts)
    assert any(c.startswith(f"test ! -e {SERVER_ENV} ||") and "exit 1" in c for c in cfg["worker_setup_commands"])
    # the head fetches it with its own role, privately, and the server reads it there
    fetch = " ".join(cfg["head_setup_commands"])
    assert "secretsmanager" in fetch and f"SecretId='{SECRET_NAME}'" in fetch and "umask 077" in fetch
    assert f". {SERVER_ENV}" in " ".join(cfg["head_start_ray_commands"])
    assert "mlflow-server.env" not in " ".join(cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_head_setup_writes_the_secret_privately_and_workers_refuse_it(name, tmp_path):
    """The launcher's own head and worker setup commands, run by bash: boto3 is a stand-in that
    answers only the secret and region the head's IAM policy grants."""
    cfg = _launcher(name)
    granted = next(st for a, st in _actions(_policy("head")) if a == "secretsmanager:GetSecretValue")["Resource"]
    region, name_pattern = granted.split(":")[3], granted.split(":secret:")[1]
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "boto3.py").write_text(
        "import fnmatch\n"
        "class _C:\n"
        "    def __init__(self, region): self.region = region\n"
        "    def get_secret_value(self, SecretId):\n"
        f"        assert self.region == {region!r} and fnmatch.fnmatch(SecretId + '-abcdef', {name_pattern!r}), SecretId\n"
        "        return {'SecretString': 'MLFLOW_AUTH_ADMIN_PASSWORD=pw-from-the-secret\\n'}\n"
        "def client(service, region_name=None):\n"
        "    assert service == 'secretsmanager'\n"
        "    return _C(region_name)\n")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(stub), "PATH": f"{shim}:{os.environ['PATH']}"}
    for cmd in cfg["head_setup_commands"]:
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    written = home / ".conmim" / "mlflow-server.env"
    assert written.read_text() == "MLFLOW_AUTH_ADMIN_PASSWORD=pw-from-the-secret\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600 and not list(written.parent.glob("*.part"))
    guard = " && ".join(cfg["worker_setup_commands"])
    r = subprocess.run(["bash", "-c", guard], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "must not be on a worker node" in r.stderr  # the file is there: refused
    written.unlink()
    assert subprocess.run(["bash", "-c", guard], env=env, timeout=30).returncode == 0


def test_only_the_head_role_may_read_the_mlflow_server_secret():
    head, worker = _policy("head"), _policy("worker")
    reads = [st for a, st in _actions(head) if a == "secretsmanager:GetSecretValue"]
    assert len(reads) == 1 and reads[0]["Effect"] == "Allow"
    assert reads[0]["Resource"] == \
        f"arn:aws:secretsmanager:us-west-2:FILL_IN_ACCOUNT_ID:secret:{SECRET_NAME}-??????"  # that secret only
    # the workers' role reads no secret store at all, and can do nothing the head's cannot
    worker_actions = {a for a, _ in _actions(worker)}
    assert not {a for a in worker_actions if a.split(":")[0] in ("secretsmanager", "ssm", "kms", "s3")}
    assert worker_actions < {a for a, _ in _actions(head)}
    readme = (CLUSTER / "README.md").read_text()
    assert f"aws secretsmanager create-secret --region $REGION --name {SECRET_NAME}" in readme


def test_mlflow_server_refuses_the_database_master_user(tmp_path):
    role = "postgresql://mlflow_server:pw@db:5432/mlflow"
    r = _mlflow_server_args(tmp_path, MLFLOW_BACKEND_STORE_URI=role)
    assert r.returncode == 0 and f"--backend-store-uri {role}" in r.stdout, r.stderr
    for var, uri, extra in [
            ("MLFLOW_BACKEND_STORE_URI", "postgresql://postgres:pw@db:5432/mlflow", {}),
            ("MLFLOW_BACKEND_STORE_URI", "postgresql+psycopg2://pgmaster:pw@db/mlflow", {}),
            ("MLFLOW_BACKEND_STORE_URI", "postgresql://db:5432/mlflow", {}),  # no user: libpq's default
            ("MLFLOW_BACKEND_STORE_URI", "postgresql://boss:pw@db/mlflow", {"MLFLOW_DB_ADMIN_USERS": "boss"}),
            ("MLFLOW_AUTH_DATABASE_URI", "postgresql://rdsadmin:pw@db/mlflow_auth", {})]:
        r = _mlflow_server_args(tmp_path, **{var: uri}, **extra)
        assert r.returncode == 2 and var in r.stderr and "mlflow-db-role.sql" in r.stderr, (uri, r.stderr)
        assert "ARGS" not in r.stdout and "pw@" not in r.stderr  # nothing started, no password echoed
    # the docs give the server its own role in every URI they write
    readme = (CLUSTER / "README.md").read_text()
    uris = re.findall(r"postgresql://([^:@\s]+):", readme)
    assert uris and set(uris) == {"mlflow_server"}, uris
    assert "--master-username pgmaster --manage-master-user-password" in readme


def test_mlflow_db_role_sql_grants_its_own_databases_only():
    sql = (CLUSTER / "mlflow-db-role.sql").read_text()
    stmts = [s.strip() for s in re.sub(r"--[^\n]*", "", sql).split(";") if s.strip()]
    create = next(s for s in stmts if s.startswith("CREATE ROLE"))
    assert all(w in create.split() for w in ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"))
    assert "NOINHERIT" not in create  # a database's owner creates tables through pg_database_owner
    for db in ("mlflow", "mlflow_auth"):
        assert f'CREATE DATABASE {db} OWNER :"role"' in stmts and f"REVOKE ALL ON DATABASE {db} FROM PUBLIC" in stmts
    assert stmts[-1] == 'REVOKE :"role" FROM CURRENT_USER'


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("psql") is None,
                    reason="PostgreSQL's initdb/psql are not installed")
def test_mlflow_db_role_sql_on_a_real_postgresql():
    """cluster/mlflow-db-role.sql run as an RDS-like master (CREATEROLE, CREATEDB, not superuser) on
    a real PostgreSQL, listening on a Unix socket only: the role owns and can build its two
    databases, cannot create databases or roles, and no other role may connect to them."""
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="conmim-pg-"))  # pytest's tmp_path is private to root: PostgreSQL refuses root
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(d, "nobody")
    sql = d / "role.sql"
    shutil.copyfile(CLUSTER / "mlflow-db-role.sql", sql)
    os.chmod(sql, 0o644)

    def run(*args, check=True):
        r = subprocess.run(as_user + list(args), capture_output=True, text=True, timeout=120, cwd=d)
        assert not check or r.returncode == 0, r.stdout + r.stderr
        return r

    def psql(user, db, *args, check=True):
        return run("psql", "-h", str(d), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", db, *args,
                   check=check)
    run("initdb", "-D", str(d / "data"), "-U", "super", "-A", "trust")
    run("pg_ctl", "-D", str(d / "data"), "-o", f"-c listen_addresses='' -k {d}", "-l", str(d / "log"), "-w", "start")
    try:
        psql("super", "postgres", "-c", "CREATE ROLE pgmaster LOGIN CREATEROLE CREATEDB; CREATE ROLE other LOGIN")
        psql("pgmaster", "postgres", "-v", "role=mlflow_server", "-v", "pw=role-pw", "-f", str(sql))
        assert psql("super", "postgres", "-c", "SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                    "WHERE rolname = 'mlflow_server'").stdout.split() == ["f|f|f|t"]
        assert psql("super", "postgres", "-c", "SELECT datname || ':' || pg_get_userbyid(datdba) FROM pg_database "
                    "WHERE datname LIKE 'mlflow%' ORDER BY 1").stdout.split() == \
            ["mlflow:mlflow_server", "mlflow_auth:mlflow_server"]
        for db in ("mlflow", "mlflow_auth"):  # MLflow's migrations create tables there
            psql("mlflow_server", db, "-c", "CREATE TABLE t (x int); DROP TABLE t")
            assert "CONNECT" in psql("other", db, "-c", "SELECT 1", check=False).stderr
        assert "permission denied" in psql("mlflow_server", "postgres", "-c", "CREATE DATABASE x", check=False).stderr
        assert "permission denied" in psql("mlflow_server", "postgres", "-c", "CREATE ROLE y", check=False).stderr
        assert psql("super", "postgres", "-c", "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON "
                    "r.oid = m.roleid WHERE r.rolname = 'mlflow_server'").stdout.split() == ["0"]
    finally:
        run("pg_ctl", "-D", str(d / "data"), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 5. KubeRay: EFA, pods kept between trials and not evicted, the head fenced, /dev/shm, FSx writes
# ---------------------------------------------------------------------------------------------
def _docs(kind, file=None):
    return [d for f, d in _manifests() if d["kind"] == kind and (file is None or f == file)]


def _env(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_kuberay_gpu_pods_use_efa_as_the_launcher_does():
    rc = _docs("RayCluster")[0]
    group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu8")
    pod = group["template"]["spec"]
    worker = pod["containers"][0]
    # every EFA interface of a p5.48xlarge (the launcher config's 32 efa-only network cards)
    p5 = _launcher("aws-p5-paper.yaml")
    cards = sum(ni["InterfaceType"] == "efa-only" for ni in
                p5["available_node_types"]["gpu8"]["node_config"]["NetworkInterfaces"])
    for side in ("requests", "limits"):
        assert worker["resources"][side]["vpc.amazonaws.com/efa"] == str(cards) == "32"
    # the same libfabric/NCCL settings as the launcher's GPU nodes
    launcher_env = dict(re.findall(r"\b((?:FI|NCCL)_[A-Z_]+)=(\S+?);?(?=\s|$)", " ".join(p5["worker_start_ray_commands"])))
    env = _env(worker)
    assert launcher_env and all(env[k] == v for k, v in launcher_env.items()), (launcher_env, env)
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "IPC_LOCK" in worker["securityContext"]["capabilities"]["add"]  # EFA pins memory
    assert {"key": "vpc.amazonaws.com/efa", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "FI_PROVIDER" not in _env(head) and "vpc.amazonaws.com/efa" not in str(head["resources"])
    # the trials' MLflow login reaches the workers as before (not the admin)
    assert {e["name"]: e for e in worker["env"]}["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        "conmim-mlflow-client"


def test_kuberay_keeps_a_trials_pods_between_trials_and_from_eviction():
    rc = _docs("RayCluster")[0]
    # idle GPU pods stay as long as idle nodes do on the launcher config (20 min, not KubeRay's 60 s)
    idle = rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert idle == _launcher("aws-p5-paper.yaml")["idle_timeout_minutes"] * 60 >= 600
    # no voluntary disruption of a running trial: Karpenter's annotation on every Ray pod, and a PDB
    templates = [rc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    for t in templates:
        assert t["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    (pdb,) = _docs("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 0 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"]}  # head and workers
    # /dev/shm: a memory-backed volume on the head as on the workers
    for t in templates:
        spec = t["spec"]
        shm = [m["name"] for c in spec["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, t
        vol = next(v for v in spec["volumes"] if v["name"] == shm[0])
        assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]


def test_kuberay_head_admits_only_its_cluster_the_submitter_and_the_operator():
    rc = _docs("RayCluster")[0]
    name = rc["metadata"]["name"]
    policies = [p for p in _docs("NetworkPolicy", "raycluster.yaml")]
    (pol,) = policies
    assert pol["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    rules = pol["spec"]["ingress"]
    for rule in rules:  # an empty `from` or an ipBlock would admit everything / anything outside
        assert rule.get("from") and all("ipBlock" not in peer for peer in rule["from"]), rule
    # the cluster's own pods: every port (GCS, object and node managers, workers)
    own = [r for r in rules if r["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": name}}}]]
    assert len(own) == 1 and "ports" not in own[0]
    # everyone else: only the dashboard / Jobs API and Ray Client ports, and only the submitter and the operator
    others = [r for r in rules if r is not own[0]]
    assert others and all(sorted(p["port"] for p in r["ports"]) == [8265, 10001] for r in others)
    peers = [peer for r in others for peer in r["from"]]
    submitter = _docs("RayJob")[0]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    for peer in peers:
        labels = peer["podSelector"]["matchLabels"]
        if "namespaceSelector" in peer:  # any namespace: the operator's pods only
            assert labels == {"app.kubernetes.io/name": "kuberay-operator"}
        else:  # this namespace: the RayJob's submitter, by the label its template gives it
            assert labels.items() <= submitter.items() and labels
    assert "6379" not in json.dumps(others)  # GCS only from the cluster's pods


def test_kuberay_data_job_writes_fsx_without_fsgroup(tmp_path):
    (job,) = _docs("Job", "imagenet-data-job.yaml")
    pod = job["spec"]["template"]["spec"]
    assert "fsGroup" not in json.dumps(job)  # RWX CSI drivers (FSx for Lustre, EFS) ignore it
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert (uid, gid) == (1000, 100) and pod["securityContext"]["runAsNonRoot"] is True  # the image's user `ray`
    (init,) = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"]  # the pinned project image, no other pull
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"]["drop"] == ["ALL"] and "CHOWN" in sc["capabilities"]["add"]
    assert sc["allowPrivilegeEscalation"] is False
    mount = next(m for m in init["volumeMounts"] if m["name"] == "datasets")
    assert mount["mountPath"] == "/mnt/datasets" and not mount.get("readOnly")
    script = init["command"][-1]
    assert f"chown {uid}:{gid} /mnt/datasets" in script and "-R" not in script  # the volume root only
    main_c = pod["containers"][0]
    assert main_c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    if os.geteuid() == 0:  # the initContainer's script, run on a folder standing in for the volume
        vol = tmp_path / "datasets"
        vol.mkdir()
        r = subprocess.run(init["command"][:-1] + [script.replace("/mnt/datasets", str(vol))], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        st = vol.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o755)


# ---------------------------------------------------------------------------------------------
# 6. One paper-scale command, resolving to the trial the cost figures count
# ---------------------------------------------------------------------------------------------
def _paper_commands(text):
    """Every `conmim sweep sweeps/ablations.yaml ... base=vit-b16-imagenet` command in a Markdown
    file's code blocks, continuation lines joined, indentation dropped."""
    found = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):  # (every block, so none is misread as a fence)
        if lang not in ("", "bash", "sh"):
            continue
        lines, cmd = [], []
        for ln in block.splitlines():
            ln = ln.strip()
            if cmd or ln.startswith("conmim sweep sweeps/ablations.yaml"):
                cmd.append(ln.rstrip("\\").strip())
                if not ln.endswith("\\"):
                    lines.append(" ".join(cmd))
                    cmd = []
        found += [c for c in lines if "base=vit-b16-imagenet" in c]
    return found


def _resolve(args):
    r = CliRunner().invoke(main, args + ["--dry-run", "--configs"])
    assert r.exit_code == 0, r.output
    docs = list(yaml.safe_load_all(r.output[r.output.index("--- # sweep"):]))
    return docs[0], docs[1:], r.output


def test_paper_scale_command_is_one_and_resolves_to_the_costed_trial():
    readme, cluster_readme = (REPO / "README.md").read_text(), (CLUSTER / "README.md").read_text()
    (main_cmd,) = _paper_commands(readme)
    (cluster_cmd,) = _paper_commands(cluster_readme)
    assert main_cmd == cluster_cmd
    args = shlex.split(main_cmd.replace("$HEAD_IP", "10.0.1.23"))
    assert args[:2] == ["conmim", "sweep"] and "--address" in args  # checked as `--address` checks it
    sweep, trials, out = _resolve(args[1:])
    assert sweep["resources"]["max_concurrent_trials"] == 1  # the sweep file's 2 is for the tiny study
    # the tiny study's selection budget (lrs for batch 64) is not the paper's: every arm runs the reference recipe
    assert sweep["selection"] is None
    preset = yaml.safe_load((REPO / "conmim" / "config" / "presets" / "vit-b16-imagenet.yaml").read_text())
    assert sweep["storage"] == "/mnt/shared/ray_results" and sweep["mlflow"]["tracking_uri"] == "http://10.0.1.23:5000"
    # what cluster/README.md's cost table counts: epochs, distinct and pre-trained trials
    cost = cluster_readme[cluster_readme.index("## Cost (estimate)"):cluster_readme.index("## Data:")]
    pre_epochs = int(re.search(r"pre-training, (\d+) epochs", cost).group(1))
    ft_epochs = int(re.search(r"fine-tuning, (\d+) epochs", cost).group(1))
    n_trials, n_pre = map(int, re.search(r"(\d+) distinct trials, (\d+) of them pre-trained", cost).groups())
    assert len(trials) == n_trials == 30 and sum(t["pretrain"]["enabled"] for t in trials) == n_pre == 25
    p5_vcpus, pod_cpus = 192, int(_docs("RayCluster")[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]
                                   ["containers"][0]["resources"]["requests"]["cpu"])
    for t in trials:
        res, data, pre, ft = t["resources"], t["data"], t["pretrain"], t["finetune"]
        assert (data["name"], data["root"]) == ("parquet", IMAGENET)
        assert (res["num_workers"], res["gpus_per_worker"], res["use_gpu"]) == (32, 1, True)
        assert pre["compile"] is True  # the measured loop was compiled
        assert pre["batch_size"] // (res["num_workers"] * pre["accumulate"]) == 64  # 64 per GPU, as measured
        assert (pre["epochs"] if pre["enabled"] else pre_epochs) == pre_epochs and ft["epochs"] == ft_epochs
        assert (pre["lr"], pre["lr_batch_size"]) == (preset["pretrain"]["lr"], preset["pretrain"]["lr_batch_size"])
        # 16 loader processes per GPU worker fit its 20 CPUs, and 8 workers fit a p5 node and the KubeRay pod
        assert data["num_workers"] == 16 and res["cpus_per_worker"] == 20
        assert data["num_workers"] < res["cpus_per_worker"] and 8 * res["cpus_per_worker"] <= min(p5_vcpus, pod_cpus)
    # the KubeRay RayJob runs the same trials (its MLflow server is in-cluster)
    rj = shlex.split(_docs("RayJob")[0]["spec"]["entrypoint"])
    rj_sweep, rj_trials, _ = _resolve(rj[3:] + ["--address", "http://127.0.0.1:8265"])
    assert rj_trials == trials
    assert all(rj_sweep["resources"][k] == sweep["resources"][k] for k in ("max_concurrent_trials", "cpus_per_worker"))


def test_cost_section_names_every_phase_with_its_source():
    text = (CLUSTER / "README.md").read_text()
    cost = text[text.index("## Cost (estimate)"):text.index("## Data:")]
    rows = {r.split("|")[1].strip(): r for r in cost.splitlines() if r.startswith("| ")}
    for phase, source in (("pre-training", "measured"), ("probes", "counted"), ("fine-tuning", "counted")):
        row = next(v for k, v in rows.items() if k.startswith(phase))
        assert source in row, row
    # the MFU the figures stand for, from the README's own numbers (datasheet peak 989.4 TFLOP/s)
    lo, hi, gflop = 1309.4, 1582.1, 173.9
    assert f"{lo * gflop / 989.4e3 * 100:.0f}–{hi * gflop / 989.4e3 * 100:.0f} %" == "23–28 %"
    assert "MFU of 23–28 % for pre-training" in cost and "multiply by 1.6" not in text
    assert "≈ 2 h trial" not in text and "of a 2.5–3 h trial" in text


# ---------------------------------------------------------------------------------------------
# 6. Credentials in a --set stay out of the Ray job's entrypoint, metadata and runtime_env
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s, secret", [
    ("mlflow.tracking_uri=http://10.0.1.23:5000", False), ("storage=/mnt/shared/ray_results", False),
    ("base=vit-b16-imagenet", False), ("mlflow.tracking_uri=https://conmim:pw-123456@h:5000", True),
    ("mlflow.tracking_uri=https://h/?token=abc", True), ("base.set.some.password=hunter2", True)])
def test_secret_sets_are_recognised(s, secret):
    from conmim.run.secret_sets import is_secret_set, shown_set
    assert is_secret_set(s) is secret
    assert (shown_set(s) != s) is secret
    assert ("***" in shown_set(s)) is secret


def test_sweep_job_keeps_credentials_out_of_its_entrypoint(tmp_path, recording_client, monkeypatch):
    from conmim.config.expand import load_sweep
    from conmim.run.secret_sets import SECRET_SETS
    shipped = tmp_path / "shipped"

    def submit_job(self, **kw):  # record, and keep what the working_dir would upload
        type(self).submitted.append(kw)
        shutil.copytree(kw["runtime_env"]["working_dir"], shipped)
        return kw["submission_id"]
    monkeypatch.setattr(_RecordingClient, "submit_job", submit_job)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\nbase: tiny\nstorage: {tmp_path}/ray_results\n")
    secret_set = "mlflow.tracking_uri=http://conmim:hunter2-pw@10.0.1.23:5000"
    r = CliRunner().invoke(main, ["sweep", str(sweep), "--no-follow", "--address", "http://127.0.0.1:8265",
                                  "--set", "seeds=[0]", "--set", secret_set])
    assert r.exit_code == 0, r.output
    assert "hunter2-pw" not in r.output and "http://conmim:***@10.0.1.23:5000" in r.output  # echoed, redacted
    (kw,) = recording_client.submitted
    assert "hunter2-pw" not in json.dumps({k: v for k, v in kw.items()}, default=str)  # entrypoint, metadata, env
    assert kw["metadata"]["conmim.secret_sets"] == "mlflow.tracking_uri=http://conmim:***@10.0.1.23:5000"
    args = shlex.split(kw["entrypoint"])
    assert args[-2:] == ["--secret-sets", SECRET_SETS] and "seeds=[0]" in args
    # the job still gets the real URI: from a private file of its working_dir
    secret_file = shipped / SECRET_SETS
    assert json.loads(secret_file.read_text()) == [secret_set]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    monkeypatch.chdir(shipped)  # the job's driver runs in its working_dir
    sweep_doc, _, out = _resolve(args[3:])
    assert sweep_doc["mlflow"]["tracking_uri"] == "http://conmim:***@10.0.1.23:5000" and "hunter2-pw" not in out
    from conmim.run.secret_sets import read_secret_sets
    plain = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    sw = load_sweep(args[4], plain + read_secret_sets(SECRET_SETS), check_paths=False)
    assert sw.spec.mlflow.tracking_uri == "http://conmim:hunter2-pw@10.0.1.23:5000"
    # without credentials nothing changes: no file, the entrypoint as before
    recording_client.submitted.clear()
    shutil.rmtree(shipped)
    r = CliRunner().invoke(main, ["sweep", str(sweep), "--no-follow", "--address", "http://127.0.0.1:8265",
                                  "--set", "mlflow.tracking_uri=http://10.0.1.23:5000"])
    assert r.exit_code == 0 and "--secret-sets" not in recording_client.submitted[0]["entrypoint"], r.output
    assert not (shipped / SECRET_SETS).exists()
