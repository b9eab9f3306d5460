"""The Docker/compose failover story.

``test_compose_failover_end_to_end`` runs ``scripts/compose-e2e``: a private Docker engine, the
image built from the wheelhouse, the 3-node compose cluster secured with TLS, mutual TLS on the
Raft port, a cluster secret and bearer tokens, its protections probed, a leader container killed
and restarted. It needs root and opts in with ``RAFTKV_E2E=1`` (it installs packages and changes
the network state while it runs, restoring it afterwards); otherwise it skips and says why.

The other tests check compose.yaml, the cluster file and the Dockerfile statically and run
anywhere (the compose.yaml ones need PyYAML and skip without it). One runs the certs service's
script on the host, twice, so what it makes is checked against what the nodes are told to use.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from raftkv.credentials import Credentials

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("n1", "n2", "n3")  # the nodes of the cluster file
JOINER = "n4"  # profile "join": joins the running cluster (serve --join)
CERTS_SERVICE = "certs"
CERTS_DIR = Path("/certs")  # where the nodes mount the credentials (read-only)
CA_VOLUME = "ca"  # holds the CA key; no node may mount it
GUARDED = ipaddress.IPv4Network("10.213.0.0/16")
FAILOVER_LIMIT_S = 10.0


# -- the real thing --------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_compose_failover_end_to_end() -> None:
    if os.environ.get("RAFTKV_E2E") != "1":
        pytest.skip("set RAFTKV_E2E=1 to run the Docker compose end-to-end test (needs root)")
    if os.geteuid() != 0:
        pytest.skip("the Docker compose end-to-end test needs root to run a private dockerd")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "compose-e2e")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=840,
        check=False,
    )
    out = proc.stdout
    print(out)
    tail = out[-6000:]
    skipped = re.search(r"^SKIPPED: (.*)$", out, re.M)
    if proc.returncode == 0 and skipped:
        pytest.skip(f"compose-e2e skipped: {skipped.group(1)}")
    assert proc.returncode == 0, f"scripts/compose-e2e exited {proc.returncode}:\n{tail}"
    assert "COMPOSE E2E PASSED" in out, tail
    assert "FAILOVER DEMO PASSED" in out, tail

    killed = re.search(r"^OK: all (\d+) keys read back intact after killing (n\d)$", out, re.M)
    assert killed, f"no proof that every key was readable after the kill:\n{tail}"
    victim = killed.group(2)
    assert victim in SERVICES

    took = re.search(r"^OK: writes succeeded on every shard ([0-9.]+)s after the kill", out, re.M)
    assert took, f"no proof that writes resumed after the kill:\n{tail}"
    assert float(took.group(1)) <= FAILOVER_LIMIT_S, took.group(0)

    assert re.search(rf"^OK: {victim} caught up after [0-9.]+s", out, re.M), (
        f"no proof that the restarted {victim} caught up:\n{tail}"
    )
    assert re.search(r"^OK: all (\d+) keys intact across the whole story$", out, re.M), tail
    assert not re.search(r"^FAIL: ", out, re.M), tail

    # What an operator sees and keeps: metrics, top, a backup that restores elsewhere.
    assert re.search(rf"^│ {victim} +│ NO +│", out, re.M), f"no top frame with {victim} down"
    for step in (
        r"one leader per shard, and the leaders hold the \d+ keys, as scraped from /metrics",
        r"the backup holds every key written so far, and its checksums verify",
        r"the backup copied out of n1 to .*demo\.backup",
        r"the backup restored into a new local cluster serves all \d+ keys, with their values "
        r"and versions, and nothing else",
    ):
        assert re.search(rf"^OK: {step}$", out, re.M), f"missing step {step!r}:\n{tail}"

    # Replacing a node lost for good (scripts/replace-demo.sh), each step.
    assert "REPLACE DEMO PASSED" in out, tail
    for step in (
        r"n3 is gone for good \(container and data volume deleted\)",
        r"n3 removed as dead: every group runs on its two live replicas after [0-9.]+s",
        r"n4 joined and is healthy",
        r"every shard back at full replication \(3 replicas agree, no move left\) after [0-9.]+s",
        r"all \d+ keys intact after replacing n3 with n4",
    ):
        assert re.search(rf"^OK: {step}$", out, re.M), f"missing step {step!r}:\n{tail}"

    # The protections, as the demo probed them (its lines "    <what it saw>", then "OK: ...").
    made = set(re.findall(r"node-(n\d)\.crt: CN=\1 SANs=DNS:\1,", out))
    assert made == {*SERVICES, JOINER}, f"the certs service did not list every node cert: {made}"
    assert re.search(r"^OK: no node container holds the CA key, and /certs is read-only", out, re.M)
    plain = dict(
        re.findall(
            r"^ +(n\d):7001: plaintext -> (\w+); TLS with the CA, no token -> SERVING$", out, re.M
        )
    )
    assert sorted(plain) == list(SERVICES), f"not every gRPC port was probed:\n{tail}"
    assert all(code not in ("SERVING", "OK") for code in plain.values()), plain
    assert re.search(r"^OK: every gRPC port refuses plaintext and serves TLS$", out, re.M)
    for line in (
        "Get over TLS without a token -> UNAUTHENTICATED",
        "Get with an admin token signed by another key -> UNAUTHENTICATED",
        "Put with the admin token -> OK",
        "Get with the read token -> OK",
        "Put with the read token -> PERMISSION_DENIED",
    ):
        assert re.search(rf"^ +{line}$", out, re.M), f"missing {line!r}:\n{out[-12000:]}"
    for what in (
        "a call without a token is refused",
        "a token signed by another key is refused",
        "a read token can Get but not Put",
    ):
        assert re.search(rf"^OK: {what}$", out, re.M), what
    raft = re.findall(
        r"^ +(n\d):7101: TLS client without a certificate -> refused after the handshake", out, re.M
    )
    assert sorted(raft) == list(SERVICES), f"not every Raft port refused a certless client: {raft}"
    assert re.search(r"^OK: every Raft port refuses a TLS client without a certificate$", out, re.M)


# -- static checks -----------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def node_services(compose: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (compose.get("services") or {}).items() if k != CERTS_SERVICE}


def command_args(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command")
    return command.split() if isinstance(command, str) else list(command or [])


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (flags without a value map to "")."""
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else ""
            assert arg not in values, f"{arg} given twice: {args}"
            values[arg] = "" if nxt.startswith("--") else nxt
    return values


def test_compose_services_run_one_node_each_from_the_local_image() -> None:
    compose = load_compose()
    services = compose.get("services") or {}
    assert sorted(services) == sorted([CERTS_SERVICE, *SERVICES, JOINER]), sorted(services)
    for name, svc in node_services(compose).items():
        assert svc.get("image") == "raftkv:local", (name, svc.get("image"))
        assert svc.get("pull_policy") == "never", (name, svc.get("pull_policy"))
        build = svc.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context and (ROOT / context / "Dockerfile").is_file(), (name, build)
        args = command_args(svc)
        assert args[:1] == ["serve"], (name, args)
        assert args[args.index("--id") + 1] == name, (name, args)
        assert args[args.index("--data-dir") + 1] == "/data", (name, args)
        if name == JOINER:
            # not in the cluster file: it joins through the others, behind a profile
            assert svc.get("profiles") == ["join"], svc.get("profiles")
            assert "--cluster" not in args, args
            flags = flag_values(args)
            assert flags["--join"] == ",".join(f"{n}:7001" for n in SERVICES), flags
            assert (flags["--grpc"], flags["--raft"]) == (f"{name}:7001", f"{name}:7101")
            continue
        assert not svc.get("profiles"), (name, svc.get("profiles"))
        cluster_file = args[args.index("--cluster") + 1]
        assert f"./cluster/compose.toml:{cluster_file}:ro" in svc.get("volumes", []), (
            name,
            svc.get("volumes"),
        )
    for name, svc in services.items():
        assert not svc.get("ports"), f"{name} publishes host ports: {svc.get('ports')}"


def test_compose_data_lives_in_named_volumes() -> None:
    compose = load_compose()
    declared = compose.get("volumes") or {}
    for name, svc in node_services(compose).items():
        data_mounts = [v for v in svc.get("volumes", []) if str(v).split(":")[1] == "/data"]
        assert len(data_mounts) == 1, (name, svc.get("volumes"))
        source = data_mounts[0].split(":")[0]
        assert not source.startswith((".", "/")), f"{name}: /data is a bind mount ({source})"
        assert source in declared, f"{name}: volume {source} is not declared at the top level"
    sources = {
        v.split(":")[0]
        for svc in node_services(compose).values()
        for v in svc["volumes"]
        if v.split(":")[1] == "/data"
    }
    assert len(sources) == len(SERVICES) + 1, f"services share a data volume: {sources}"


def test_compose_healthchecks_ask_the_grpc_health_service_over_tls() -> None:
    compose = load_compose()
    cluster = tomllib.loads((ROOT / "cluster" / "compose.toml").read_text())
    for name, svc in node_services(compose).items():
        hc = svc.get("healthcheck")
        assert isinstance(hc, dict) and hc.get("test"), f"{name} has no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: not exec form: {test!r}"
        script = " ".join(test[1:])
        assert "HealthCheckRequest" in script and "grpc_health" in script, script
        assert "start_interval" not in hc, f"{name}: start_interval needs engine API 1.44"
        # TLS, verified with the cluster CA; the health service needs no token.
        assert "insecure_channel" not in script, f"{name}: the healthcheck dials plaintext"
        assert "grpc.secure_channel(os.environ['RAFTKV_GRPC']" in script, script
        assert "ssl_channel_credentials(root_certificates=" in script, script
        assert "os.environ['RAFTKV_CACERT']" in script, script
        env = svc.get("environment", {})
        assert env.get("RAFTKV_CACERT") == str(Credentials(CERTS_DIR).ca), (name, env)
        # The health probe dials the address the node binds: its own gRPC address.
        probe = env.get("RAFTKV_GRPC")
        own = flag_values(command_args(svc)).get("--grpc") or cluster["nodes"][name]["grpc"]
        assert probe == own, (name, probe)


def test_compose_nodes_serve_tls_on_both_ports_with_a_secret_and_tokens() -> None:
    """The flags are exactly the documented secure set-up (``Credentials.serve_args``)."""
    compose = load_compose()
    for name, svc in node_services(compose).items():
        flags = flag_values(command_args(svc))
        wanted = Credentials(CERTS_DIR).serve_args(name)
        assert len(wanted) % 2 == 0 and wanted, wanted
        for flag, value in zip(wanted[::2], wanted[1::2], strict=True):
            assert flags.get(flag) == value, f"{name}: {flag} is {flags.get(flag)!r}, not {value}"
        # `docker compose exec <node> raftkv client ...` trusts the CA and sends the admin token.
        env = svc.get("environment", {})
        for key, value in Credentials(CERTS_DIR).client_env().items():
            assert env.get(key) == value, (name, key, env.get(key))
        assert "RAFTKV_TOKEN" not in env, f"{name}: a token in the environment leaks via inspect"


def test_compose_nodes_mount_the_credentials_read_only_once_they_exist() -> None:
    compose = load_compose()
    declared = compose.get("volumes") or {}
    assert CERTS_SERVICE in declared and CA_VOLUME in declared, sorted(declared)
    for name, svc in node_services(compose).items():
        volumes = [str(v) for v in svc.get("volumes", [])]
        assert f"{CERTS_SERVICE}:{CERTS_DIR}:ro" in volumes, (name, volumes)
        assert not [v for v in volumes if v.split(":")[0] == CA_VOLUME], (
            f"{name} mounts the CA key volume: {volumes}"
        )
        dep = (svc.get("depends_on") or {}).get(CERTS_SERVICE)
        assert dep == {"condition": "service_completed_successfully"}, (name, svc.get("depends_on"))


def test_certs_service_is_a_one_shot_of_the_node_image() -> None:
    compose = load_compose()
    svc = compose["services"][CERTS_SERVICE]
    nodes = node_services(compose)
    assert svc.get("image") == nodes["n1"]["image"], svc.get("image")
    assert svc.get("pull_policy") == "never"
    assert "user" not in svc, "the certs service must run as the image's non-root user"
    assert str(svc.get("restart")) == "no", svc.get("restart")
    assert svc.get("network_mode") == "none", "making credentials needs no network"
    assert not svc.get("healthcheck"), "a one-shot service has nothing to check"
    env = svc.get("environment") or {}
    volumes = [str(v) for v in svc.get("volumes", [])]
    assert f"{CERTS_SERVICE}:{env.get('CERTS')}" in volumes, (env, volumes)
    assert f"{CA_VOLUME}:{env.get('CA')}" in volumes, (env, volumes)
    assert env.get("CERTS") == str(CERTS_DIR), env
    node_cluster = [v for v in nodes["n1"]["volumes"] if str(v).startswith("./cluster/")]
    assert f"{node_cluster[0].rsplit(':', 2)[0]}:{env.get('CLUSTER')}:ro" in volumes, volumes
    script = certs_script(svc)
    assert "raftkv certs init" in script and "raftkv auth init" in script, script


def certs_script(svc: dict[str, Any]) -> str:
    entrypoint = svc.get("entrypoint")
    assert entrypoint == ["sh", "-ec"], entrypoint
    command = svc.get("command")
    assert isinstance(command, list) and len(command) == 1, command
    raw = command[0]
    assert isinstance(raw, str), raw
    # Compose interpolates $VAR from the host; the script's own variables must be written $$.
    assert "$" not in raw.replace("$$", ""), "a single $ in the certs script"
    return raw.replace("$$", "$")


def test_certs_service_makes_what_the_nodes_use_once(tmp_path: Path) -> None:
    """Run the certs service's script on the host (twice, after a run that died halfway)."""
    compose = load_compose()
    svc = compose["services"][CERTS_SERVICE]
    script = certs_script(svc)
    bindir = Path(sys.executable).parent
    if not (bindir / "raftkv").exists() or shutil.which("sh") is None:
        pytest.skip("needs sh and the raftkv command beside this python")
    certs, ca = tmp_path / "certs", tmp_path / "ca"
    certs.mkdir()
    ca.mkdir()
    (certs / ".new").mkdir()
    (certs / ".new" / "leftover").write_text("from a run that died halfway\n")
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "CERTS": str(certs),
        "CA": str(ca),
        "CLUSTER": str(ROOT / "cluster" / "compose.toml"),
    }

    def run() -> str:
        proc = subprocess.run(
            ["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    first = run()
    made = sorted(p.name for p in certs.iterdir())
    assert ".new" not in made and "leftover" not in made, made
    assert "ca.key" not in made, "the CA key is in the volume every node mounts"
    assert sorted(p.name for p in ca.iterdir()) == ["ca.key"]
    for node in (*SERVICES, JOINER):
        assert f"node-{node}.crt" in first, first  # it lists what it made
    # Every file a node is told to use exists, under the nodes' mount point.
    for name, node_svc in node_services(compose).items():
        paths = [v for v in command_args(node_svc) if v.startswith(f"{CERTS_DIR}/")]
        paths += [v for v in node_svc["environment"].values() if v.startswith(f"{CERTS_DIR}/")]
        assert len(paths) >= 8, (name, paths)
        for path in paths:
            assert (certs / Path(path).relative_to(CERTS_DIR)).is_file(), (name, path)
        # Clients and the healthcheck dial <service>:7001: the node's certificate must name it.
        cert = x509.load_pem_x509_certificate((certs / f"node-{name}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in san.get_values_for_type(x509.DNSName), (name, san)
    for secret in ("raft.secret", "auth.key", "admin.token", "node-n1.key"):
        assert (certs / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"

    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    second = run()
    assert "keeping them" in second, second
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before, (
        "the second run changed files"
    )


def test_compose_network_has_a_fixed_subnet_inside_the_guarded_range() -> None:
    compose = load_compose()
    networks = compose.get("networks") or {}
    assert networks, "no networks declared"
    for name, svc in node_services(compose).items():
        used = svc.get("networks") or []
        assert used and all(n in networks for n in used), (name, used)
    for net_name, net in networks.items():
        configs = ((net or {}).get("ipam") or {}).get("config") or []
        subnets = [ipaddress.ip_network(c["subnet"]) for c in configs if "subnet" in c]
        assert subnets, f"network {net_name} has no fixed subnet"
        for subnet in subnets:
            inside = isinstance(subnet, ipaddress.IPv4Network) and subnet.subnet_of(GUARDED)
            assert inside, f"{subnet} is outside {GUARDED}"


def test_cluster_file_addresses_nodes_by_service_name() -> None:
    cluster = tomllib.loads((ROOT / "cluster" / "compose.toml").read_text())
    assert cluster["shards"] == 8 and cluster["replicas"] == 3, cluster
    assert sorted(cluster["nodes"]) == list(SERVICES)
    for name, node in cluster["nodes"].items():
        assert node["grpc"] == f"{name}:7001", node
        assert node["raft"] == f"{name}:7101", node


def test_dockerfile_is_conventional() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "ARG BASE=python:3.11-slim", lines[0]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all(ln.split()[1] == "${BASE}" for ln in froms), froms
    assert "--no-index --find-links /wheels" in text
    assert re.search(r"^USER raftkv$", text, re.M), "the image does not run as user raftkv"
    assert re.search(r"install -d -o raftkv -g raftkv .*/data", text), "/data is not raftkv's"
    # Named volumes start out with the owner of their mount point: the certs service must be
    # able to write /certs (credentials) and /ca (the CA key) as user raftkv.
    owned = re.search(r"install -d -o raftkv -g raftkv -m 0700 (.*?);", text)
    assert owned and set(owned.group(1).split()) >= {"/certs", "/ca"}, "/certs, /ca not raftkv's"
    assert re.search(r'^ENTRYPOINT \["raftkv"\]$', text, re.M)
    assert re.search(r'^CMD \["serve"', text, re.M)
    assert re.search(r"^EXPOSE 7001 7101 9101$", text, re.M)


def test_scripts_are_executable_bash() -> None:
    for script in ("failover-demo.sh", "replace-demo.sh", "compose-e2e"):
        path = ROOT / "scripts" / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
