"""Targets: presets from published figures, files in TOML/JSON, and refusal of bad ones."""

import dataclasses

import pytest

from compiler.targets import PRESETS, WSE2, WSE3, MeshTarget, TargetError, load_target


def test_wse2_preset_matches_published_figures():
    assert (WSE2.width, WSE2.height) == (750, 994)
    assert WSE2.sram_bytes == 48 * 1024
    assert WSE2.link_bytes_per_cycle == 4  # one 32-bit wavelet per cycle
    assert WSE2.colours == 24
    # ~7.5 PFLOP/s fp16 for the wafer (FACTS.md), from 8 FLOP/cycle x cores x 1.1 GHz
    assert WSE2.peak_flops("fp16") == pytest.approx(6.56e15, rel=0.01)
    assert WSE2.cores * WSE2.sram_bytes == pytest.approx(36.6e9, rel=0.01)


def test_wse3_is_larger():
    assert (WSE3.width, WSE3.height) == (762, 1172)
    assert WSE3.cores > WSE2.cores


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_target_file_round_trip(tmp_path, suffix):
    custom = dataclasses.replace(WSE2, name="big-sram", sram_bytes=96 * 1024,
                                 link_bytes_per_cycle=8.0)
    path = tmp_path / f"t{suffix}"
    custom.save(path)
    assert load_target(str(path)) == custom


def test_presets_by_name():
    assert load_target("WSE2") is WSE2
    assert load_target("test8x8").cores == 64
    assert set(PRESETS) >= {"wse2", "wse3"}


@pytest.mark.parametrize("field,value,msg", [
    ("width", 0, "width=0 must be > 0"),
    ("link_bytes_per_cycle", 0.0, "link_bytes_per_cycle=0.0 must be > 0"),
    ("sram_bytes", -1, "sram_bytes=-1 must be > 0"),
    ("hop_latency_cycles", -2, "hop_latency_cycles=-2 must be an int >= 0"),
    ("flops_per_cycle", (("fp99", 1.0),), "dtype 'fp99'"),
])
def test_impossible_targets_are_refused(field, value, msg):
    with pytest.raises(TargetError, match=msg):
        dataclasses.replace(WSE2, **{field: value})


def test_bad_target_files_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nwidth = [")
    with pytest.raises(TargetError, match="cannot parse"):
        load_target(str(bad))
    missing = tmp_path / "missing.json"
    missing.write_text('{"name": "x"}')
    with pytest.raises(TargetError, match="missing field"):
        load_target(str(missing))
    with pytest.raises(TargetError, match="not a preset"):
        load_target("nonexistent-target")
    d = WSE2.to_dict() | {"warp_drive": 1}
    with pytest.raises(TargetError, match="unknown field 'warp_drive'"):
        MeshTarget.from_dict(d)


def test_missing_dtype_rate_names_the_dtype():
    with pytest.raises(TargetError, match="no compute rate for dtype 'int8'"):
        WSE2.rate("int8")
