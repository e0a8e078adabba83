"""The API's pure questions: filters refused at the border with the field named, key-based
pages that neither skip nor repeat, counters summed over a service port's svc_ids."""
from __future__ import annotations

import base64
import dataclasses
import gc
import ipaddress
import weakref

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


@pytest.fixture(scope="module")
def pages(view):
    return queries.SortedView(view)


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



def _encoded(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("token", [
    "garbage", "%%%", "WyJhIl0=", "eyJhIjogMX0=",       # not ours, wrong shape, a dict
    _encoded("[" * 100_000 + "]" * 100_000),            # nested past json's recursion limit
    _encoded("[" * 300 + "]" * 300),                    # nested, short enough to parse
    _encoded('["ns", "web", "http", "TCP", true]'),     # a bool where the family goes
    _encoded('["ns", "web", "http", "TCP", 4, 4, "1", 80, "extra"]'),
    "A" * 5000,
], ids=["garbage", "not-base64", "short-list", "dict", "deeply-nested", "nested",
        "bool-family", "too-long-key", "huge"])
def test_a_page_token_that_is_not_ours_is_refused_naming_it(pages, token):
    for select in (queries.select_services, queries.select_backends):
        with pytest.raises(InvalidRequest, match="page_token: not one this list handed out"):
            select(pages, Filter(), 1, token)


def test_a_token_of_one_list_is_refused_by_the_other(pages):
    _, services_token = queries.select_services(pages, Filter(), 1, "")
    _, backends_token = queries.select_backends(pages, Filter(), 1, "")
    assert services_token and backends_token
    with pytest.raises(InvalidRequest, match="page_token"):
        queries.select_backends(pages, Filter(), 1, services_token)
    with pytest.raises(InvalidRequest, match="page_token"):
        queries.select_services(pages, Filter(), 1, backends_token)


def test_filters_select_by_namespace_name_and_frontend_address(pages):
    names = {(sp.name.namespace, sp.name.name, sp.name.port_name)
             for sp in queries.select_services(pages, Filter.parse(namespace="ns"), 100, "")[0]}
    assert names == {("ns", "web", "http"), ("ns", "web", "https"), ("ns", "db", "sql")}
    web = queries.select_services(pages, Filter.parse(namespace="ns", name="web"), 100, "")[0]
    assert [sp.name.port_name for sp in web] == ["http", "https"]
    assert queries.select_services(pages, Filter.parse(namespace="nx"), 100, "") == ([], "")
    by_vip = queries.select_services(pages, Filter.parse(address="10.96.0.30"), 100, "")[0]
    assert [(sp.name.name, queries.service_type(sp)) for sp in by_vip] == [("np", "NodePort")]
    by_node_ip = queries.select_services(pages, Filter.parse(address="192.168.50.1"), 100, "")[0]
    assert [sp.name.name for sp in by_node_ip] == ["np"]        # its NodePort frontend
    backends = queries.select_backends(pages, Filter.parse(address="10.244.1.3"), 100, "")[0]
    assert {(sp.name.port_name, str(b.address)) for sp, b, _ in backends} == \
        {("http", "10.244.1.3"), ("https", "10.244.1.3")}


def _every_page(select, pages, flt, size):
    seen, token = [], ""
    while True:
        page, token = select(pages, flt, size, token)
        assert len(page) <= size and (page or not seen)
        seen += page
        if not token:
            return seen


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_pages_cover_every_row_once_in_order(view, pages, size):
    everything = sorted(((sp, b, state) for sp in view.service_ports
                         for b, state in sp.backends), key=lambda r: queries.backend_key(*r[:2]))
    assert _every_page(queries.select_backends, pages, Filter(), size) == everything
    assert len(everything) == 7
    ports = sorted(view.service_ports, key=queries.service_key)
    assert _every_page(queries.select_services, pages, Filter(), size) == ports
    ns = Filter.parse(namespace="ns")
    assert _every_page(queries.select_backends, pages, ns, size) == \
        [r for r in everything if r[0].name.namespace == "ns"]


def test_a_page_token_survives_rows_removed_before_it(view, pages):
    first, token = queries.select_backends(pages, Filter(), 2, "")
    gone_sp, gone_backend, _ = first[-1]
    # the last backend handed out is gone before the next page (a new sync, a new view):
    # the page goes on after where it was, nothing skipped and nothing repeated
    without = dataclasses.replace(gone_sp, backends=tuple(
        pair for pair in gone_sp.backends if pair[0] != gone_backend))
    smaller = queries.SortedView(dataclasses.replace(view))
    index = smaller.ports.index(gone_sp)
    smaller.ports[index] = without
    rest = _every_page_from(queries.select_backends, smaller, 2, token)

    def keys(rows):
        return [queries.backend_key(sp, b) for sp, b, _ in rows]

    everything = keys(queries.select_backends(pages, Filter(), 100, "")[0])
    assert keys(first + rest) == everything       # the gone one was already handed out


def _every_page_from(select, pages, size, token):
    seen = []
    while token:
        page, token = select(pages, Filter(), size, token)
        seen += page
    return seen


def test_the_view_is_sorted_once_per_applied_state(view):
    """Pages of one view share one SortedView; a new view (a sync) gets a new one, and the
    old view is not kept alive by the cache."""
    cache = queries.SortedViewCache()
    first = cache.of(view)
    assert cache.of(view) is first
    newer = dataclasses.replace(view)           # what a sync does: a new AppliedView
    second = cache.of(newer)
    assert second is not first and cache.of(newer) is second
    alive = weakref.ref(newer)
    del newer
    gc.collect()
    assert alive() is None and cache._sorted is None


def test_counters_are_summed_over_every_svc_id_of_a_port(view, pages):
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
    assert queries.port_stats(view, stats, [np], pages.svc_ids) == [row]
