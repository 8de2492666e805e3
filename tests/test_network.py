"""The coordinator and three nodes on separate network hosts: Linux network namespaces on one
bridge, with a firewall on every node host that drops inbound connections.

Addresses (10.77.0.0/24) exist only inside the test's namespaces, and its veths are created
in them directly: the host's own interfaces and routes are never touched.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fedtrain.demos.launch import LocalConsortium
from fedtrain.node.audit_log import AuditLog
from nodes.state import StatePaths

from conftest import eventually, make_spec
from test_end_to_end import registered, write_policy

pytestmark = pytest.mark.slow

NODES = ("n0", "n1", "n2")
SUBNET = "10.77.0"
# Inbound connections that open are dropped; the replies to the node's own connections pass.
FIREWALL = """
table inet fedtrain_test {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    iif lo accept
    ct state new drop
  }
}
"""


class Network:
    """The coordinator's namespace holds a bridge (the switch) at SUBNET.1; node i's namespace
    is cabled to it by a veth pair, at SUBNET.(10 + i), behind FIREWALL."""

    def __init__(self, tag: str):
        self.hosts = {name: f"{tag}-{name}" for name in ("coordinator", *NODES)}
        self.coordinator_ip = f"{SUBNET}.1"
        self.ips = {name: f"{SUBNET}.{10 + i}" for i, name in enumerate(NODES)}
        self.created: list[str] = []

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)

    def create(self) -> None:
        for ns in self.hosts.values():
            self.ip("netns", "add", ns)
            self.created.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        hub = self.hosts["coordinator"]
        self.ip("-n", hub, "link", "add", "br0", "type", "bridge")
        self.ip("-n", hub, "addr", "add", f"{self.coordinator_ip}/24", "dev", "br0")
        self.ip("-n", hub, "link", "set", "br0", "up")
        for name, addr in self.ips.items():
            ns = self.hosts[name]
            self.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", name, "netns", hub)
            self.ip("-n", hub, "link", "set", name, "master", "br0", "up")
            self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=FIREWALL, check=True,
                           capture_output=True, text=True, timeout=10)

    def delete(self) -> None:
        """Deleting a namespace deletes the veth ends in it, and so their peers."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def on_host(self, key: str) -> list[str]:
        """LocalConsortium's process ``key`` ("coordinator", "node-NAME") on its own host."""
        return ["ip", "netns", "exec", self.hosts[key.removeprefix("node-")]]

    def python(self, host: str, code: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.on_host(host), sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kw)

    def link(self, node: str, state: str) -> None:
        """Unplug (down) or plug (up) ``node``'s cable at the switch."""
        self.ip("-n", self.hosts["coordinator"], "link", "set", node, state)


@pytest.fixture
def network():
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip("needs root and the ip and nft commands (.ci/run installs nftables); missing: "
                    + (", ".join(missing) or "root"))
    net = Network(f"ft{os.getpid()}")
    try:
        net.create()
    except subprocess.CalledProcessError as err:
        net.delete()
        pytest.skip(f"cannot create network namespaces or their firewall here: {' '.join(err.cmd)}: {err.stderr}")
    try:
        yield net
    finally:
        net.delete()


def assert_inbound_dropped(net: Network, node: str) -> None:
    """A port listening on the node's host: reached from the node's own host, dropped from the coordinator's."""
    addr = (net.ips[node], 9000)
    listener = net.python(node, f"import socket, time; s = socket.create_server({addr}); print('up', flush=True);"
                                " time.sleep(30)")
    try:
        assert listener.stdout.readline().strip() == "up"
        dial = "import socket; socket.create_connection({}, timeout=1); print('connected')".format(addr)
        assert net.python(node, dial).communicate(timeout=10)[0].strip() == "connected"
        out = net.python("coordinator", dial).communicate(timeout=10)[0]
        assert "TimeoutError" in out, out  # dropped: no answer at all, not even a refusal
    finally:
        listener.kill()
        listener.wait()


def fetched(state_dir, job_id: str, round: int) -> bool:
    """Whether the node has asked for the global model of ``round``: it is in that round."""
    return any(e["type"] == "FetchArrays" and e["job_id"] == job_id and e["round"] == round
               for e in AuditLog(StatePaths(state_dir).audit).entries())


def test_nodes_on_their_own_hosts_only_dial_out_and_one_cut_off_mid_round_rejoins(tmp_path, shards, network):
    paths, _ = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    # Local training of a second or two, so that the link is cut before node n2 can send its
    # update; a deadline that lets round 1 go on without n2 (n0 and n1 are enough).
    spec = make_spec(min_nodes=2, round_timeout=8, model={"kind": "mlp", "hidden": [64]},
                     training={"rounds": 3, "local_epochs": 5})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    with LocalConsortium(tmp_path / "run", poll_seconds=1, host=network.coordinator_ip,
                         on_host=network.on_host) as c:
        address = c.start_coordinator()
        c.enroll(list(NODES))
        for name, path in zip(NODES, paths):
            c.start_node(name, path, policy)
        registered(c, NODES)  # through the firewalls: each node dialled out
        assert_inbound_dropped(network, "n0")

        # The operator, on the coordinator's host.
        submit = subprocess.Popen([*network.on_host("coordinator"), sys.executable, "-m", "fedtrain", "job", "submit",
                                   str(spec_file), "--wait", "--coordinator", address, *c.security_args("operator")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        job_id = submit.stdout.readline().strip()
        assert job_id.isalnum(), job_id + submit.communicate(timeout=30)[0]
        eventually(lambda: fetched(c.node_state("n2"), job_id, 1), "n2 to start round 1", timeout=120, every=0.05)
        network.link("n2", "down")
        coordinator_log = c.logs / "coordinator.log"
        eventually(lambda: f"job {job_id} round 1 done" in coordinator_log.read_text(), "round 1 without n2",
                   timeout=60)
        network.link("n2", "up")
        out = submit.communicate(timeout=120)[0]
        assert submit.returncode == 0, out
    report = json.loads((c.root / "coordinator" / "reports" / job_id / "report.json").read_text())
    assert report["job"]["state"] == "finished", report["job"]["error"]
    participants = {r["round"]: sorted(r["nodes_ok"]) for r in report["rounds"]}
    assert participants[1] == ["n0", "n1"]  # the round went on without the node cut off
    assert participants[3] == list(NODES), participants  # it rejoined: late for round 2 at worst
