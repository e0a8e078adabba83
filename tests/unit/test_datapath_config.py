"""The Python datapath defaults and the C #ifndef defaults in bpf/maps.h must agree."""
from __future__ import annotations

import re
from pathlib import Path

from agent.datapath.config import DatapathConfig

MAPS_H = Path(__file__).resolve().parents[2] / "bpf" / "maps.h"


def c_defaults() -> dict[str, str]:
    text = MAPS_H.read_text()
    return dict(re.findall(r"#ifndef (BPFP_\w+)\s*\n#define \1 (.+)\n#endif", text))


def test_every_macro_has_a_c_default_and_they_agree():
    python = DatapathConfig().macros()
    c = c_defaults()
    assert set(python) == set(c), "a -D macro without a C default, or the other way"
    for name, value in python.items():
        assert c[name].strip() == value, name


def test_pinned_names_carry_the_layout_version():
    text = MAPS_H.read_text()
    version = re.search(r"#define BPFP_MAPS_VERSION (\d+)", text).group(1)
    pins = re.findall(r'BPFP_PIN\("(\w+)"\)', text)
    assert pins and all(p.endswith(f"_v{version}") for p in pins)
