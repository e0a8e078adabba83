"""The API's pure questions: filters refused at the border with the field named, key-based
pages that neither skip nor repeat, counters summed over a service port's svc_ids."""
from __future__ import annotations

import ipaddress

import pytest

from agent.api import queries
from agent.api.queries import Filter, InvalidRequest
from agent.datapath.inventory import Counters
from agent.planner import BackendAddr
from tests.unit.test_api_support import cluster, synced_status


@pytest.fixture(scope="module")
def view():
    objects, node_ips = cluster()
    status, _ = synced_status(objects, node_ips)
    return status.view


@pytest.mark.parametrize("fields, message", [
    ({"namespace": "Bad_NS"}, "filter.namespace"),
    ({"name": "x" * 64}, "filter.name"),
    ({"name": "-web"}, "filter.name"),
    ({"address": "10.0.0.300"}, "filter.address"),
    ({"address": "web"}, "filter.address"),
])
def test_malformed_filters_are_refused_naming_the_field(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        Filter.parse(**fields)


def test_page_sizes_and_tokens_are_checked():
    assert queries.page_size(0) == queries.DEFAULT_PAGE
    assert queries.page_size(10**6) == queries.MAX_PAGE
    with pytest.raises(InvalidRequest, match="page_size"):
        queries.page_size(-1)
    rows = [("a", 1), ("b", 2)]
    for token in ("garbage", "WyJhIl0=", "eyJhIjogMX0="):    # not ours, wrong shape, a dict
        with pytest.raises(InvalidRequest, match="page_token"):
            queries.paged(rows, lambda r: r, 1, token)


def test_filters_select_by_namespace_name_and_frontend_address(view):
    names = {(sp.name.namespace, sp.name.name, sp.name.port_name)
             for sp in queries.select_services(view, Filter.parse(namespace="ns"), 100, "")[0]}
    assert names == {("ns", "web", "http"), ("ns", "web", "https"), ("ns", "db", "sql")}
    by_vip = queries.select_services(view, Filter.parse(address="10.96.0.30"), 100, "")[0]
    assert [(sp.name.name, queries.service_type(sp)) for sp in by_vip] == [("np", "NodePort")]
    by_node_ip = queries.select_services(view, Filter.parse(address="192.168.50.1"), 100, "")[0]
    assert [sp.name.name for sp in by_node_ip] == ["np"]        # its NodePort frontend
    backends = queries.select_backends(view, Filter.parse(address="10.244.1.3"), 100, "")[0]
    assert {(sp.name.port_name, str(b.address)) for sp, b, _ in backends} == \
        {("http", "10.244.1.3"), ("https", "10.244.1.3")}


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_pages_cover_every_row_once_in_order(view, size):
    everything = queries.select_backends(view, Filter(), 1000, "")[0]
    seen, token = [], ""
    while True:
        page, token = queries.select_backends(view, Filter(), size, token)
        assert len(page) <= size
        seen += page
        if not token:
            break
    assert seen == everything and len(everything) == 7


def test_a_page_token_survives_rows_removed_before_it(view):
    rows = [("a",), ("b",), ("c",), ("d",)]
    first, token = queries.paged(rows, lambda r: r, 2, "")
    assert first == [("a",), ("b",)]
    # "b" (the last row handed out) is gone before the next page: nothing skipped
    assert queries.paged([("a",), ("c",), ("d",)], lambda r: r, 2, token)[0] == [("c",), ("d",)]


def test_counters_are_summed_over_every_svc_id_of_a_port(view):
    np = next(sp for sp in view.service_ports if sp.name.name == "np")
    ids = queries.svc_ids(view)[(np.name, np.family)]
    assert len(ids) == 2                       # internal (ClusterIP) and external (NodePort)
    backend = BackendAddr(ipaddress.ip_address("10.244.1.5"), 8080)
    stats = {(ids[0], None): Counters(connections=3, refused=1),
             (ids[1], None): Counters(connections=4, packets=10, bytes=900),
             (ids[0], backend): Counters(connections=3),
             (ids[1], backend): Counters(connections=4),
             (999, None): Counters(connections=50)}            # someone else's
    row, = queries.port_stats(view, stats, [np])
    assert row.counters == Counters(connections=7, packets=10, bytes=900, refused=1)
    assert row.backends == ((backend, "ready", Counters(connections=7)),)
    db = next(sp for sp in view.service_ports if sp.name.name == "db")
    assert queries.port_stats(view, {}, [db])[0].counters == Counters()
