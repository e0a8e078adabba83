"""What people and scripts read: tables that show state and counters at a glance, JSON and
YAML that parse back to the same data, health verdicts kube-proxy's probes understand."""
from __future__ import annotations

import json

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli_output
from agent.agent import AgentStatus
from agent.api import client
from agent.api.generated import agent_pb2
from agent.api.healthz import LOOP_STALE, Health
from agent.api.observed import Observed

PORT = {"namespace": "ns", "name": "web", "port_name": "http", "protocol": "TCP",
        "family": 4, "type": "NodePort",
        "frontends": [{"address": "10.96.0.10", "port": 80, "kind": "ClusterIP"},
                      {"address": "192.168.1.1", "port": 30080, "kind": "NodePort"}],
        "backends": [{"address": "10.244.1.2", "port": 8080, "state": "ready"},
                     {"address": "10.244.1.3", "port": 8080, "state": "terminating"}]}


def test_services_table_shows_type_frontends_backends_with_state_and_counters():
    empty = dict(PORT, name="db", backends=[], type="ClusterIP")
    text = cli_output.services_table([PORT, empty], {
        ("ns", "web", "http", "TCP"): {"connections": 12345, "refused": 0}})
    header, web, db = text.splitlines()
    assert header.split()[:5] == ["SERVICE", "PORT", "PROTO", "TYPE", "FRONTENDS"]
    assert "ns/web" in web and "NodePort" in web and "192.168.1.1:30080 (NodePort)" in web
    assert "10.244.1.3:8080 (terminating)" in web and "12.3k" in web
    assert "(none: connections refused)" in db
    # columns line up: every row's FRONTENDS starts where the header's does
    assert web.index("10.96.0.10") == header.index("FRONTENDS")


def test_structured_output_parses_back_to_the_same_data():
    data = [PORT]
    assert json.loads(cli_output.dump(data, "json")) == data
    assert yaml.safe_load(cli_output.dump(data, "yaml")) == data


_TEXT = st.text(max_size=12)          # any character: quotes, controls, non-ASCII
_PORTS = st.integers(0, 2**32 - 1)
_SERVICE_PORT = st.builds(
    agent_pb2.ServicePort, namespace=_TEXT, name=_TEXT, port_name=_TEXT, protocol=_TEXT,
    family=st.sampled_from([4, 6]), type=_TEXT, held_back=_TEXT,
    frontends=st.lists(st.builds(agent_pb2.Frontend, address=_TEXT, port=_PORTS, kind=_TEXT,
                                 allocated=st.booleans()), max_size=3),
    backends=st.lists(st.builds(agent_pb2.Backend, address=_TEXT, port=_PORTS, state=_TEXT),
                      max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(_SERVICE_PORT, max_size=4))
def test_services_json_is_json_dumps_of_the_entries_character_for_character(ports):
    """`services -o json` writes its text without json's pure-Python indenting encoder:
    the same text as json.dumps(indent=2) of the documented entries, whatever they hold."""
    expected = json.dumps([client.service_entry(p) for p in ports], indent=2)
    assert "".join(client.services_json(ports)) == expected


def test_stats_table_indents_backends_under_their_port():
    counters = {"connections": 3, "packets": 0, "bytes": 2048, "refused": 1, "dropped": 0}
    text = cli_output.stats_table([{
        "namespace": "ns", "name": "web", "port_name": "http", "protocol": "TCP",
        "family": 4, "counters": counters,
        "backends": [{"address": "10.244.1.2", "port": 8080, "state": "ready",
                      "counters": dict(counters, refused=0)}]}])
    _, port, backend = text.splitlines()
    assert port.startswith("ns/web:http/TCP") and "2.0KiB" in port
    assert backend.startswith("  -> 10.244.1.2:8080 (ready)")


def test_event_lines_say_what_happened_and_what_was_missed():
    sync = {"time_unix": 0.0, "kind": "sync", "message": "", "duration_seconds": 0.0123,
            "operations": 7, "full": False, "event_to_kernel_seconds": 0.05,
            "service_ports": 4, "dropped_before": 2}
    line = cli_output.event_record(sync, "table")
    assert "sync: 7 map ops in 0.012s, 4 service ports" in line and "missed 2" in line
    assert json.loads(cli_output.event_record(sync, "json")) == sync
    failed = dict(sync, kind="sync_failed", message="map full", dropped_before=0)
    assert cli_output.event_line(failed).endswith("sync_failed: map full")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_healthz_is_503_until_synced_then_200_until_the_sync_is_stale():
    status = AgentStatus()
    clock = Clock(1000.0)
    health = Health(Observed(status, sync_period=30.0), now=clock)
    code, body = health.healthz()
    assert code == 503 and "first sync" in body["reason"] and body["lastUpdated"] == ""
    status.synced, status.last_sync_unix = True, 990.0
    code, body = health.healthz()
    assert code == 200 and "reason" not in body
    assert body["lastUpdated"].startswith("1970-01-01T00:16:30") and body["nodeEligible"]
    clock.now = 990.0 + 61                   # more than 2 sync periods
    code, body = health.healthz()
    assert code == 503 and "last sync 61s ago" in body["reason"]


def test_livez_fails_when_the_loop_stops_turning():
    clock = Clock(0.0)
    health = Health(Observed(AgentStatus()), now=clock)
    assert health.livez()[0] == 200
    clock.now = LOOP_STALE + 1
    code, body = health.livez()
    assert code == 503 and "loop" in body["reason"]


def test_snat_ports_and_tc_events_reach_status_and_metrics():
    from prometheus_client import generate_latest

    from agent.api.client import to_plain
    from agent.api.metrics import Metrics
    from agent.api.server import _flow_table
    from agent.datapath.conntrack import FlowTableStats
    status = AgentStatus()
    status.flows = FlowTableStats(entries=10, flows=5, snat_ports_in_use=4,
                                  snat_ports_busiest=3, snat_port_range=4536, removed=2,
                                  finished_unix=1.0,
                                  events={"no_snat_port": 7, "snat_port_reused": 9})
    text = generate_latest(Metrics(Observed(status)).registry).decode()
    assert "bpfproxy_snat_ports_in_use 4.0" in text
    assert "bpfproxy_snat_ports_busiest_backend 3.0" in text
    plain = {"flows": to_plain(_flow_table(status.flows)), "synced": False,
             "node_name": "n", "source": "s", "version": "v", "last_sync_unix": 0,
             "last_sync_seconds": 0, "last_event_to_kernel_seconds": 0, "syncs": 0,
             "full_syncs": 0, "change_syncs": 0, "sync_errors": 0, "errors": {},
             "programs": [], "maps": [],
             "source_state": {"kind": "manifests", "location": "d", "complete": True}}
    line = next(x for x in cli_output.status_text(plain).splitlines()
                if x.startswith("flows"))
    assert "5 from outside (10 entries)" in line and "4 in use" in line
    assert "busiest backend 3 of 4536" in line and "no_snat_port=7" in line
    # before a first sweep (or without --interfaces) neither shows anything
    assert "snat" not in generate_latest(Metrics(Observed(AgentStatus())).registry).decode()
