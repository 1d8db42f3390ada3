"""The doctor: real probes for smax (and grf where built), a located-not-launched sc2."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import pytest

from marl_shared import doctor
from marl_shared.doctor import SimulatorReport, render_report
from marl_shared.envs import SimulatorMissingError

SC2_FIX = "Run `bash envs/install_sc2.sh` on a machine with internet access."


def assert_one_sentence(message: str) -> None:
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z`]", message[:-1]), message


def test_smax_is_usable_after_building_and_stepping_smax_3m():
    report = doctor.diagnose_smax()
    assert report.backend == "smax"
    assert report.usable is True
    assert report.version == importlib.metadata.version("jaxmarl")
    assert "smax/3m" in report.detail and "3 agents" in report.detail
    assert_one_sentence(report.detail)
    assert report.fix is None


def test_sc2_without_a_game_is_unusable_with_the_install_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no_game_here"))
    report = doctor.diagnose_sc2()
    assert report.backend == "sc2"
    assert report.usable is False
    assert report.fix == SC2_FIX
    assert_one_sentence(report.detail)
    assert_one_sentence(report.fix)


def test_sc2_with_smacv2_game_and_maps_in_place_is_reported_found(monkeypatch, tmp_path):
    from marl_shared.envs import sc2

    (tmp_path / "Versions" / "Base75689").mkdir(parents=True)
    (tmp_path / "Maps" / "SMAC_Maps").mkdir(parents=True)
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    monkeypatch.setattr(sc2, "smacv2_installed", lambda: True)
    report = doctor.diagnose_sc2()
    assert report.usable is True and report.fix is None
    assert "Base75689" in report.detail and "does not launch" in report.detail
    assert_one_sentence(report.detail)


@pytest.mark.grf
@pytest.mark.skipif(
    importlib.util.find_spec("gfootball") is None, reason="the football engine is not built"
)
def test_grf_is_usable_after_building_and_stepping_one_engine():
    report = doctor.diagnose_grf()
    assert report.usable is True, report.detail
    assert report.version == importlib.metadata.version("gfootball")
    assert "grf/academy_empty_goal_close" in report.detail


def _fake_probe(exc: Exception):
    def step_once(task_name: str) -> str:
        raise exc

    return doctor._probe("smax", "numpy", "numpy", "smax/3m", "Fix it.", step_once=step_once)


def test_probe_turns_a_missing_simulator_into_an_unusable_report():
    report = _fake_probe(SimulatorMissingError("The engine is not installed; run the script."))
    assert (report.usable, report.fix) == (False, "Fix it.")
    assert report.detail == "The engine is not installed; run the script."


def test_probe_turns_any_failure_into_one_sentence():
    report = _fake_probe(RuntimeError("boom.\nTraceback line two\nmore"))
    assert report.usable is False
    assert report.detail == "Building smax/3m failed with RuntimeError: boom."
    assert_one_sentence(report.detail)


def test_probe_names_a_missing_adapter_module():
    report = _fake_probe(ModuleNotFoundError("gone", name="marl_shared.envs.smax"))
    assert report.usable is False
    assert "marl_shared.envs.smax is missing" in report.detail
    assert_one_sentence(report.detail)


def test_probe_of_an_uninstalled_package_skips_the_step():
    def never(task_name: str) -> str:
        raise AssertionError("must not be called")

    report = doctor._probe("grf", "no_such_pkg_xyz", "no-such-pkg", "grf/x", "Fix.", never)
    assert report == SimulatorReport(
        "grf", False, None, "The no_such_pkg_xyz package is not installed.", "Fix."
    )


def test_library_versions_report_torch_ray_jax_and_cpus():
    info = doctor.library_versions()
    for name in ("torch", "ray", "jax"):
        assert info[name] == importlib.metadata.version(name)
    assert str(os.cpu_count()) in info["cpus"]


def test_render_report_is_a_plain_table_with_fixes_and_libraries():
    reports = [
        SimulatorReport("smax", True, "0.2.0", "Built smax/3m and stepped it once.", None),
        SimulatorReport("sc2", False, None, "StarCraft II is not usable [here].", SC2_FIX),
    ]
    text = render_report(reports, libraries={"torch": "2.13.0", "cpus": "2"})
    lines = text.splitlines()
    assert lines[0] == "Simulators"
    assert lines[1].split() == ["backend", "usable", "version", "detail"]
    smax_row = next(line for line in lines if line.startswith("smax"))
    assert smax_row.split()[:3] == ["smax", "yes", "0.2.0"]
    sc2_row = next(line for line in lines if line.startswith("sc2 "))
    assert sc2_row.split()[:3] == ["sc2", "no", "-"]
    assert f"  sc2: {SC2_FIX}" in lines
    assert "smax:" not in text  # nothing to fix there
    assert any(line.split() == ["torch", "2.13.0"] for line in lines)
    assert any(line.split() == ["cpus", "2"] for line in lines)
