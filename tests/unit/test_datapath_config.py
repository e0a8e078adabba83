"""What C and Python share agrees with bpf/maps.h, its source: the -D defaults, the flags,
the event slots, the map names, pins and sizes."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from agent.datapath import layout
from agent.datapath.config import MACROS, NODEPORT_MODES, DatapathConfig
from agent.planner import kernel
from agent.planner.capacity import BUDGETED_MAPS

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


# --- what C and Python share: bpf/maps.h is the source, Python mirrors it ---------------

def c_numbers() -> dict[str, int]:
    """Every BPFP_* macro maps.h defines as a number (#ifndef defaults included)."""
    return {name: int(value) for name, value in
            re.findall(r"^#define (BPFP_\w+)\s+(\d+)\b", MAPS_H.read_text(), re.M)}


def c_tables() -> dict[str, tuple[str, str]]:
    """table -> (max_entries as written, pin) of every BPF_TABLE_PINNED in maps.h."""
    found = re.findall(r'BPF_TABLE_PINNED\("\w+",[^,]+,[^,]+,\s*(\w+),\s*(\w+),\s*'
                       r'BPFP_PIN\("(\w+)"\)', MAPS_H.read_text())
    return {table: (size, pin) for table, size, pin in found}


# C macro families and the module that mirrors each (its name without BPFP_); C_ONLY: what
# only the programs use
MIRRORS = {"BPFP_SVC_F_": kernel, "BPFP_BE_": kernel, "BPFP_MAGLEV_ROW": kernel,
           "BPFP_CT_": layout, "BPFP_SOCK_REVNATS": layout}
C_ONLY = {"BPFP_CT_TIME_WAIT_HOLD"}       # a time, read by nodeport.c alone


def flag_pairs(numbers: dict[str, int]) -> list[tuple[str, object]]:
    """(C macro, the Python module that must mirror it) for every shared flag and size."""
    config_macros = set(DatapathConfig().macros())
    return [(name, module) for name in sorted(numbers) for family, module in MIRRORS.items()
            if name.startswith(family) and name not in config_macros and name not in C_ONLY]


def test_flags_and_sizes_have_the_values_maps_h_gives():
    numbers = c_numbers()
    pairs = flag_pairs(numbers)
    assert {"BPFP_SVC_F_MAGLEV", "BPFP_BE_LOCAL", "BPFP_CT_REPLY", "BPFP_MAGLEV_ROW"} <= \
        {name for name, _ in pairs}
    for name, module in pairs:
        mirrored = getattr(module, name.removeprefix("BPFP_"), None)
        assert mirrored == numbers[name], f"{module.__name__}.{name[5:]}: {mirrored} " \
                                          f"but bpf/maps.h {name} is {numbers[name]}"


def test_no_python_flag_without_its_c_macro():
    """A flag added on the Python side only would be written into maps no program reads."""
    numbers = c_numbers()
    for family, module in MIRRORS.items():
        python = {name for name in vars(module) if name.startswith(family[5:]) and
                  name.isupper() and isinstance(getattr(module, name), int)}
        missing = {name for name in python if f"BPFP_{name}" not in numbers}
        assert not missing, f"{module.__name__}: {sorted(missing)} not in bpf/maps.h"


@pytest.mark.parametrize("prefix,names,slots", [
    ("BPFP_SOCKEV_", layout.SOCK_EVENTS, layout.SOCK_EVENT_SLOTS),
    ("BPFP_TCEV_", layout.TC_EVENTS, layout.TC_EVENT_SLOTS),
], ids=["socket", "tc"])
def test_event_slots_are_named_as_maps_h_numbers_them(prefix, names, slots):
    numbers = c_numbers()
    c_slots = {name.removeprefix(prefix).lower(): value for name, value in numbers.items()
               if name.startswith(prefix) and name != f"{prefix}SLOTS"}
    assert c_slots == {name: slot for slot, name in enumerate(names)}
    assert numbers[f"{prefix}SLOTS"] == slots and len(names) <= slots


def test_map_names_pins_and_sizes_are_the_ones_maps_h_declares():
    tables = c_tables()
    numbers = c_numbers()
    specs = {**layout.MAPS, layout.SOCKET_STORAGE.table: layout.SOCKET_STORAGE}
    assert set(tables) == set(specs)
    for table, spec in specs.items():
        size, pin = tables[table]
        assert (spec.table, spec.pin) == (table, pin)
        if isinstance(spec.size, str):                  # a DatapathConfig field: its macro
            assert size == MACROS[spec.size], table
        else:
            assert numbers.get(size, int(size) if size.isdigit() else None) == spec.size, table


def test_the_planner_budgets_maps_that_exist():
    assert set(BUDGETED_MAPS) <= set(layout.MAPS)
    budgeted = {"bpfp_svc4", "bpfp_svc6", "bpfp_slot4", "bpfp_slot6", "bpfp_srcrange",
                "bpfp_maglev"}
    assert set(BUDGETED_MAPS) == budgeted


# The checks must be able to fail: a header that disagrees is caught.
def test_a_disagreeing_header_is_caught(monkeypatch, tmp_path):
    changed = MAPS_H.read_text().replace("#define BPFP_SVC_F_MAGLEV        2",
                                         "#define BPFP_SVC_F_MAGLEV        4")
    changed = changed.replace("BPFP_TCEV_TCP_NOT_SYN", "BPFP_TCEV_NOT_SYN")
    changed = changed.replace("bpfp_affinity_ext, BPFP_MAX_AFFINITY",
                              "bpfp_affinity_ext, BPFP_MAX_STATS")
    assert changed.count("BPFP_MAX_STATS") == MAPS_H.read_text().count("BPFP_MAX_STATS") + 1
    header = tmp_path / "maps.h"
    header.write_text(changed)
    monkeypatch.setattr(sys.modules[__name__], "MAPS_H", header)
    with pytest.raises(AssertionError, match="SVC_F_MAGLEV"):
        test_flags_and_sizes_have_the_values_maps_h_gives()
    with pytest.raises(AssertionError):
        test_event_slots_are_named_as_maps_h_numbers_them("BPFP_TCEV_", layout.TC_EVENTS,
                                                          layout.TC_EVENT_SLOTS)
    with pytest.raises(AssertionError, match="bpfp_affinity_ext"):
        test_map_names_pins_and_sizes_are_the_ones_maps_h_declares()


def test_nodeport_modes_are_passed_as_maps_h_numbers_them():
    """--nodeport-mode NAME reaches the programs as BPFP_NODEPORT_MODE, the value of maps.h's
    BPFP_NODEPORT_<NAME>."""
    numbers = c_numbers()
    for mode in NODEPORT_MODES:
        macros = DatapathConfig(nodeport_mode=mode).macros()
        assert int(macros["BPFP_NODEPORT_MODE"]) == numbers[f"BPFP_NODEPORT_{mode.upper()}"]
