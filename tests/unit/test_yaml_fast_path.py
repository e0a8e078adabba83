"""YAML files that YAML 1.1 and 1.2 read alike are parsed by yaml-rs (issue 16: ~6x faster
than PyYAML's C loader on manifests); every other file, and every error, by PyYAML. The
result is PyYAML's, value for value and type for type, whichever parser ran."""
from __future__ import annotations

import datetime
import re

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sources import manifests

# scalars the two YAML versions read differently, or that look like them
DIFFERENT = [
    "yes", "No", "on", "OFF", "010", "-01", "0o17", "0b101", "0x1F", "1_000", "1:20",
    "1:20.5", "1e3", "1.5e3", "1.0e+3", "+1", ".5", "1.", ".inf", "-.Inf", ".NaN",
    "2024-01-02", "2024-01-02T10:00:00Z", "=", '"tab\\there"', '"\\/"', '"\\x41"', "<<",
    "!!str 5", "!custom x", "&a 1", "*a", "[1, on]", "{a: 1, b: no}", "%x", "...", "|", ">",
    ":", "? x",
]
# and ordinary ones (some not valid YAML where they stand: both parsers refuse those)
ALIKE = [
    "y", "n", "true", "False", "TRUE", "null", "Null", "~", "", "0", "7", "-3", "-0",
    "-0.0", "0.5", "3.14", "1.2.3", "10.96.0.1", "fd00::1", "svc-000001-abcde", "a=b",
    "50%", "web", "http", "TCP", "8080", "65535", "'quoted'", '"dq"', "a b", "0a", "1a",
    "no-op", "[1, 2]", "{a: 1, b: web}", "#x", "-", "a: b", "@x", "`x", "---", "b|c", "x > y",
]
# mostly ordinary: a good share of files is all ordinary, and takes the fast path
token = st.one_of(*[st.sampled_from(ALIKE)] * 4, st.sampled_from(DIFFERENT))
key = st.sampled_from(["name", "port", "on", "n", "1", "010", "a=b", "x y", "null", "ip"])


@st.composite
def block(draw, depth=0):
    """A block mapping or sequence, as text, indented by depth levels."""
    pad = "  " * depth
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        sequence = draw(st.booleans())
        lead = f"{pad}- " if sequence else f"{pad}{draw(key)}:"
        if depth < 2 and draw(st.integers(0, 3)) == 0:
            lines.append(lead.rstrip() + "\n" + draw(block(depth + 1)))
        else:
            lines.append(f"{lead}{'' if sequence else ' '}{draw(token)}\n")
    return "".join(lines)


@st.composite
def file_text(draw):
    documents = draw(st.lists(block(), min_size=1, max_size=3))
    start = draw(st.sampled_from(["", "---\n", "# c\n---\n"]))
    return start + "---\n".join(documents) + draw(st.sampled_from(["", "---\n"]))


def strictly_equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(strictly_equal(a[k], b[k]) for k in a) and \
            all(type(x) is type(y) for x, y in zip(a, b, strict=True))
    if isinstance(a, list):
        return len(a) == len(b) and all(strictly_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@settings(max_examples=600, deadline=None)
@given(file_text())
def test_the_fast_parser_agrees_with_pyyaml_or_stands_aside(text):
    try:
        want = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError:
        want = None
    fast = manifests._load_plain_yaml(text)
    if fast is not None:
        assert want is not None, f"PyYAML refuses what the fast path read: {text!r}"
        assert strictly_equal(fast, want), (text, fast, want)


def test_kubernetes_manifests_take_the_fast_path_and_read_the_same():
    text = (
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-0001\n  namespace: shop\n"
        "  labels:\n    app.kubernetes.io/name: web\n  annotations:\n"
        "    note: 'a plain, quoted: text'\n    url: http://web.shop:8080/x\n"
        "spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ipFamilies: [IPv4]\n"
        "  selector: {app: web}\n  ports:\n  - name: http\n    port: 80\n"
        "    targetPort: 8080\n    protocol: TCP\n  sessionAffinity: None\n"
        "---\n"
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n"
        "addressType: IPv6\nendpoints:\n- addresses: [\"fd00::1\"]\n  conditions:\n"
        "    ready: true\n    terminating: false\nports:\n- port: 8080\n  name: http\n")
    fast = manifests._load_plain_yaml(text)
    assert fast is not None and len(fast) == 2
    assert strictly_equal(fast, list(yaml.load_all(text, Loader=yaml.CSafeLoader)))
    assert manifests._load_yaml(text) == fast


def test_what_yaml_1_1_reads_otherwise_goes_to_pyyaml():
    cases = {"a: on\n": True, "a: 010\n": 8, "a: 1:20\n": 80, "a: 1e3\n": "1e3",
             "a: 2024-01-02\n": datetime.date(2024, 1, 2)}
    for text, value in cases.items():
        assert manifests._load_plain_yaml(text) is None, text
        assert manifests._load_yaml(text) == [{"a": value}], text


def test_errors_are_pyyamls_own():
    """yaml-rs refuses a duplicate key that PyYAML reads (the last wins), and both refuse a
    broken file: the outcome and the message are PyYAML's."""
    assert manifests._load_yaml("a: 1\na: 2\n") == [{"a": 2}]
    for broken in ("a: [1, 2\n", "a: b: c\n", "- a\nb: c\n"):
        try:
            list(yaml.load_all(broken, Loader=yaml.CSafeLoader))
        except yaml.YAMLError as e:
            want = str(e)
        try:
            manifests._load_yaml(broken)
        except yaml.YAMLError as e:
            assert str(e) == want
        else:
            raise AssertionError(f"{broken!r} was read")


# The gate as it was with a blank run before ":" or "?" (quadratic in a run of blanks: a line
# of 60k spaces took 28 s); the gate now finds the same texts without rescanning the run.
_GATE_WITH_BLANK_RUN = re.compile(
    manifests._YAML_1_1_ONLY.pattern.replace(r"| [:?](?:\s|$)", r"| \s*[:?](?:\s|$)", 1),
    manifests._YAML_1_1_ONLY.flags)


@settings(max_examples=800, deadline=None)
@given(st.text(alphabet=" \t\n\u00a0\u2003:?,[{ab-#", max_size=60))
def test_the_gate_finds_what_it_found_with_a_blank_run_before_a_colon(text):
    assert _GATE_WITH_BLANK_RUN.pattern != manifests._YAML_1_1_ONLY.pattern
    assert (bool(manifests._YAML_1_1_ONLY.search("\n" + text))
            == bool(_GATE_WITH_BLANK_RUN.search("\n" + text)))
