"""The Flower Deployment Engine for real: a SuperLink with TLS and `--enable-supernode-auth`, SuperNodes with
registered keys, each a separate process tree (deploy.deployment.Deployment), driven through the `flwr` CLI.

1. Two rounds of federated MAML on sinusoid with three registered SuperNodes; a fourth SuperNode whose key was
   never registered is refused (it exits, the SuperLink logs the refusal, it never appears among the nodes).
2. A SuperNode SIGKILLed in the middle of a round: the round completes with the others, the dead node's failure
   is in clients.csv, and the node, restarted with the same key, trains again in a later round.
3. "Separate machines": `python -m deploy.launch --netns` runs the same federation with the SuperLink, every
   SuperNode and the operator CLI each in its own network namespace (veth pairs on a bridge, private addresses);
   skipped where namespaces are unavailable. The launcher also stops everything on Ctrl-C.

Everything runs in tmp directories with free ports and its own FLWR_HOMEs; every process is stopped afterwards.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from deploy import netns
from deploy.deployment import Deployment
from deploy.processes import marked
from fedmeta.results import load_run

# Tiny federated MAML: 2 local meta-iterations of 5 tasks, 5 held-out tasks with 2 adaptation steps.
RUN = {"task": "sinusoid", "algorithm": "maml", "num-rounds": 2, "local-iterations": 2, "meta-batch-size": 5,
       "eval-tasks": 5, "eval-steps": 2, "heldout-partitions": 1, "min-train-nodes": 2, "round-timeout": 600.0,
       "threads": 1, "assign-partitions": False}  # each node trains the partition of its node config
ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # a documented Flower setting (default 1 s); see the guide
SUPERLINK_NODE_ID = 1
REPO = Path(__file__).resolve().parents[1]  # src_node_id of the error replies the SuperLink writes itself


def _pem(private_key: Path) -> bytes:
    key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _no_processes_left(d: Deployment) -> None:
    assert not [s.name for s in d.services if s.alive()]
    assert not d.leftovers()  # no SuperExec/flwr-serverapp/flwr-clientapp orphan either


def _node_ids(frame):
    """node_id is UInt64 (Flower ids use all 64 bits): compare as Python ints, never via int64."""
    return [int(x) for x in frame["node_id"]]


def _run(d: Deployment, base: Path, name: str, timeout: float = 600.0, **overrides):
    run_id = d.start_run({**RUN, **overrides, "results-dir": str(base), "run-name": name})
    status = d.wait_run(run_id, base / name, timeout=timeout)
    d.save_log(run_id)
    return run_id, status, load_run(base / name)


def _federation(d: Deployment, n: int = 3) -> dict[str, int]:
    d.make_certificates()
    d.start_superlink()
    for i in range(n):  # the last node also sets its own data-dir (a node-config key the ClientApp honours)
        d.add_node(f"node-{i}", i, n, extra={"data-dir": str(REPO.parent / "shared" / "data")} if i == n - 1 else None)
    for name in list(d.nodes):
        d.start_node(name)
    return {name: node.node_id for name, node in d.nodes.items()}


def _check_two_rounds(run, ids: dict[str, int]) -> None:
    assert run.status["status"] == "completed", run.status
    r, c = run.rounds, run.clients
    assert list(r["round"]) == [1, 2]
    assert (r["num_sampled"] == 2).all() and (r["num_replies"] == 2).all() and (r["num_failures"] == 0).all()
    assert r["train_loss"].notna().all() and (r["eval_loss_post"] < r["eval_loss_pre"]).all()  # adaptation helps
    assert (c["status"] == "ok").all()
    assert set(_node_ids(c)) == set(ids.values())  # exactly the registered nodes took part
    train, ev = c[c["phase"] == "train"], c[c["phase"] == "evaluate"]
    assert sorted(train["partition_id"]) == [0, 0, 1, 1] and list(ev["partition_id"]) == [2, 2]
    assert dict(zip(train["partition_id"], _node_ids(train))) == {0: ids["node-0"], 1: ids["node-1"]}
    assert (train["num_tasks"] == RUN["local-iterations"] * RUN["meta-batch-size"]).all()


def test_certs_cli_makes_a_chain_flower_accepts(tmp_path):
    """`python -m deploy.certs ca/server/node` as the guide runs it; the keys load the way Flower loads them."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    def certs(*args):
        return subprocess.run([sys.executable, "-m", "deploy.certs", *args, "--out", str(tmp_path)], cwd=REPO,
                              check=False, capture_output=True, text=True, timeout=60)

    assert certs("ca").returncode == 0
    assert certs("server", "--host", "10.1.2.3", "--host", "superlink.example.org").returncode == 0
    assert certs("node", "--name", "node-0").returncode == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    for private in ("ca.key", "server.key", "node-0"):
        assert (tmp_path / private).stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key((tmp_path / "node-0").read_bytes(), None)  # as flower-supernode
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(tmp_path / "node-0.pub")  # as `flwr supernode register`
    again = certs("node", "--name", "node-0")  # never overwrites a key
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "deploy.certs", "server", "--out", str(tmp_path / "none")],
                             cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "ca.crt is missing" in missing.stderr


def test_tls_node_auth_two_rounds_and_unregistered_node_refused(tmp_path):
    base = tmp_path / "results"
    with Deployment(tmp_path / "deploy", env=ENV) as d:
        ids = _federation(d)
        # TLS: the SuperLink presents a certificate that verifies against our CA only, naming 127.0.0.1
        host, port = d.address.rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(d.certs / "ca.crt"))
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
        with socket.create_connection((host, int(port)), timeout=10) as raw, pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=host)  # system CAs do not know it

        # a SuperNode with a valid key pair that nobody registered is refused and exits
        d.add_node("intruder", 0, 3, register=False)
        intruder = d.start_node("intruder", wait=False)
        assert intruder.proc.wait(90) == 1  # Flower logs its own exit code 305; the process exits with 1
        assert re.search(r"Exit Code: 305\s+Failed to initialize the connection to the SuperLink\.\s+"
                         r"\[code: 2004\] Failed to activate SuperNode", re.sub(r"\x1b\[[0-9;]*m", "", intruder.text()))
        pem = _pem(d.nodes["intruder"].private_key).decode().replace("\n", "\\n")
        link_log = d.link.text()
        assert re.search(r"activate-node.*ApiError:2004.*" + re.escape(pem[40:100]), link_log), link_log[-3000:]
        assert "No SuperNode found with the given public key" in link_log

        listed = d.registered_nodes()
        assert {int(n["node-id"]) for n in listed} == set(ids.values())
        assert all(n["status"] == "online" for n in listed)

        run_id, status, run = _run(d, base, "two-rounds")
        assert status["status"] == "completed"
        _check_two_rounds(run, ids)
        assert d.run_status(run_id) == "finished:completed"
        assert "round 2" in (d.workdir / "logs" / f"run-{run_id}.log").read_text()  # `flwr log --show` works

        # `flwr stop` ends a running run; the SuperLink reports it stopped
        stop_id = d.start_run({**RUN, "num-rounds": 50, "results-dir": str(base), "run-name": "stopped"})
        deadline = time.monotonic() + 120
        while d.run_status(stop_id) != "running":
            assert time.monotonic() < deadline
            time.sleep(1)
        d.flwr("stop", str(stop_id), "fedmeta-deploy")
        deadline = time.monotonic() + 60
        while not d.run_status(stop_id).startswith("finished"):
            assert time.monotonic() < deadline
            time.sleep(1)
        assert d.run_status(stop_id) == "finished:stopped"
        listed_runs = {int(r["run-id"]): r["status"] for r in d.flwr_json("ls", "fedmeta-deploy")["runs"]}
        assert listed_runs == {run_id: "finished:completed", stop_id: "finished:stopped"}
    _no_processes_left(d)


@pytest.fixture(scope="module")
def fault(tmp_path_factory):
    """Kill node-0 (SIGKILL, whole process tree) while it trains in round 1, restart it once round 1 ends."""
    tmp = tmp_path_factory.mktemp("fault")
    base = tmp / "results"
    with Deployment(tmp / "deploy", env=ENV) as d:
        ids = _federation(d)
        run_id = d.start_run({**RUN, "num-rounds": 4, "min-train-nodes": 1, "local-iterations": 20,
                              "results-dir": str(base), "run-name": "fault"})
        node0 = d.nodes["node-0"].service
        d.wait_log(node0, r"Receiving: train message", timeout=180)
        d.kill_node("node-0")
        killed_at = time.monotonic()
        rounds = base / "fault" / "rounds.csv"
        deadline = time.monotonic() + 300
        while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, "round 1 never ended after the kill"
            time.sleep(0.5)
        round1_wait = time.monotonic() - killed_at
        d.start_node("node-0")  # same key, so the SuperLink gives it back its node id
        status = d.wait_run(run_id, base / "fault", timeout=600)
        d.save_log(run_id)
    _no_processes_left(d)
    return ids, status, load_run(base / "fault"), round1_wait


@pytest.mark.slow  # ~2.5 min: Flower notices the dead node only after two missed 30 s heartbeats
def test_killed_node_fails_its_round_and_rejoins_after_restart(fault):
    ids, status, run, round1_wait = fault
    assert status["status"] == "completed-with-failures" and status["failed_clients"] == 1, status
    r, c = run.rounds, run.clients
    assert list(r["round"]) == [1, 2, 3, 4]
    c = c.assign(node=_node_ids(c))
    train = c[c["phase"] == "train"]
    dead = train[(train["round"] == 1) & (train["node"] == ids["node-0"])]
    assert list(dead["status"]) == ["failed"]  # the killed node's failure is recorded
    alive = train[(train["round"] == 1) & (train["node"] == ids["node-1"])]
    assert list(alive["status"]) == ["ok"]  # ... and the round completed with the other node
    assert r.loc[r["round"] == 1, "num_replies"].item() >= 1 and r.loc[0, "train_loss"] > 0
    back = train[(train["round"] > 1) & (train["node"] == ids["node-0"]) & (train["status"] == "ok")]
    assert len(back) >= 1  # the restarted node (same key -> same node id) trained again
    assert round1_wait < 200  # Flower gives up on the dead node after ~2 missed heartbeats, not round-timeout


@pytest.mark.slow  # shares the fixture above
def test_dead_node_is_recorded_once_under_its_own_id(fault):
    ids, _, run, _ = fault
    c, r = run.clients, run.rounds
    assert SUPERLINK_NODE_ID not in set(_node_ids(c))
    assert r.loc[r["round"] == 1, "num_failures"].item() == 1
    dead = c[(c["round"] == 1) & (c.assign(node=_node_ids(c))["node"] == ids["node-0"])]
    assert dead["reason"].str.contains("Node Unavailable").all()


def _launch(tmp_path: Path, *args: str, **run) -> subprocess.Popen:
    run = {**RUN, **{k.replace("_", "-"): v for k, v in run.items()}}  # kwargs override RUN's kebab keys
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run.items())
    return subprocess.Popen([sys.executable, "-m", "deploy.launch", "--workdir", str(tmp_path / "work"),
                             "--results-dir", str(tmp_path / "results"), "--name", "cli", "-c", overrides,
                             "--task-poll-interval", "0.1", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True, timeout=20)
    return set(out.stdout.split())


def _leftovers(workdir: Path) -> list[int]:
    return marked(f"FLWR_HOME={workdir}/")


# ~65 s on 2 cores; the same federation as the default TLS test, across namespaces (skipped without root)
@pytest.mark.slow  # ~1 min; loopback deployment runs by default in the TLS test and the latency benchmark's quick run
def test_launcher_cli_in_separate_network_namespaces(tmp_path):
    """`python -m deploy.launch --netns`: SuperLink, 3 SuperNodes and the CLI in their own namespaces."""
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable here: {why}")
    before = _namespaces()
    proc = _launch(tmp_path, "--nodes", "3", "--netns")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert re.search(r"SuperLink at 10\.77\.0\.1:\d+", out)  # nodes dial a private address, not loopback
    traffic = json.loads((tmp_path / "work" / "traffic.json").read_text())
    for host in ("node-0", "node-1", "node-2"):  # every node's traffic crossed its veth (model out and back)
        assert traffic[host]["rx_bytes"] > 10_000 and traffic[host]["tx_bytes"] > 10_000, traffic
    assert traffic["link"]["rx_bytes"] > sum(traffic[h]["tx_bytes"] for h in ("node-0", "node-1")) / 2
    run = load_run(tmp_path / "results" / "cli")
    ids = {f"node-{m.group(1)}": int(m.group(2)) for m in re.finditer(r"node-(\d+)=(\d+)", out)}
    _check_two_rounds(run, ids)
    assert not _leftovers(tmp_path / "work")
    after = _namespaces()
    assert not {n for n in after - before if n.startswith("fm")}  # all namespaces (and veth pairs) are gone


def test_launcher_cli_stops_everything_on_ctrl_c(tmp_path):
    proc = _launch(tmp_path, "--nodes", "2", num_rounds=100, heldout_partitions=0)
    lines = []
    for line in proc.stdout:  # wait until the run is under way, then press Ctrl-C
        lines.append(line)
        if "deploy.launch: run " in line:
            break
    assert proc.poll() is None, "".join(lines)
    work = tmp_path / "work"
    assert _leftovers(work)  # SuperLink, SuperNodes, SuperExecs, flwr-serverapp are running
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out
    assert "interrupted" in out
    assert not _leftovers(work)
