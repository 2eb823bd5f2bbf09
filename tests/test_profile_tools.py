"""The profile readers in benchmarks/ (no GPU needed: they parse checked-in Nsight Compute output)."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ncu_phases_reads_the_checked_in_source_counters(capsys, monkeypatch):
    tool = _load("ncu_phases")
    csv_gz = ROOT / "benchmarks" / "results" / "h200_wide" / "sass_s2bwd_s4fwd_fp32.csv.gz"
    kernels = tool.kernels(str(csv_gz))
    names = [k[0] for k in kernels]
    assert len(names) == 2 and "deform_bwd_data_kernel" in names[0] and "deform_fwd_kernel" in names[1]
    hdr, rows = kernels[0][1], kernels[0][2]
    ex = hdr.index("Instructions Executed")
    assert sum(float(r[ex] or 0) for r in rows) == 295755449  # InstructionStats of the same run
    monkeypatch.setattr("sys.argv", ["ncu_phases.py", str(csv_gz), "--kernel", "data"])
    tool.main()
    lines = capsys.readouterr().out.splitlines()
    assert "deform_bwd_data_kernel" in lines[0] and "2.958e+08 warp instructions" in lines[1]
    shares = [float(line.split()[1]) for line in lines[3:]]
    assert shares == sorted(shares) and shares[-1] == 100.0


def test_ktime_compare_reads_two_tables(capsys):
    tool = _load("ktime_table")
    base = ROOT / "benchmarks" / "results"
    before = tool.read_table(str(base / "h200_order" / "ktime.md"))
    assert before["S2,float32"] == {"data": 608.2, "weight": 260.2, "total": 868.3}
    tool.compare(str(base / "h200_order" / "ktime.md"), str(base / "h200_wide" / "ktime.md"))
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert len(rows) == 12  # the 12 backward runs both tables have
    assert "193.6 -> 165.5 (0.85x)" in rows["S3,float32"]  # the wide weight tile


def test_target_floor_reads_a_checked_in_benchmark():
    """S5 fp32 fwd+bwd (results_52c503a.json): the 4x target is the gather's 273.4 us / 4 = 68 us,
    0.43x of lax.conv's 157.5 us."""
    tool = _load("target_floor")
    text = tool.table(str(ROOT / "benchmarks" / "results" / "h200_s12" / "results_52c503a.json"))
    row = next(line for line in text.splitlines() if line.startswith("| fwdbwd float32"))
    s5 = row.split("|")[6]
    assert s5.strip().startswith("68 us = 0.43x conv"), row
