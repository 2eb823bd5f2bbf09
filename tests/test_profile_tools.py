"""The Nsight Compute readers in benchmarks/ that gpu_check.sh's sass and ktime phases run (no GPU
needed: they parse CSV exports, written here in the format ncu prints)."""

import csv
import gzip
import importlib.util
import io
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows(rows)
    return buf.getvalue()


SASS_HEADER = ["Address", "Source", "Instructions Executed", "Warp Stall Sampling (All Samples)"]


def _sass_page(path):
    """`ncu --page source --csv --print-source sass` of two kernels, the first launched twice."""
    data = [["0x00", "S2R R0, SR_TID.X ;", "100", "10"],
            ["0x10", "BAR.SYNC.DEFER_BLOCKING 0x0 ;", "100", "40"],
            ["0x20", "HMMA.16816.F32 R4, R8, R12, R4 ;", "200", "30"],
            ["0x30", "@P0 BRA 0x20 ;", "50", "0"],
            ["0x40", "EXIT ;", "50", "20"]]
    rows = []
    for name in ("void deft::kern::deform_bwd_data_kernel<float>(Geo)",
                 "void deft::kern::deform_fwd_kernel<float>(Geo)",
                 "void deft::kern::deform_bwd_data_kernel<float>(Geo)"):
        rows += [["Kernel Name", name], SASS_HEADER, *data]
    with gzip.open(path, "wt", newline="") as f:
        f.write(_csv(rows))


def test_ncu_phases_reads_the_sass_page(tmp_path, capsys, monkeypatch):
    tool = _load("ncu_phases")
    path = tmp_path / "sass.csv.gz"
    _sass_page(path)
    kernels = tool.kernels(str(path))
    assert [k[0].split("::")[-1].split("<")[0] for k in kernels] == [
        "deform_bwd_data_kernel", "deform_fwd_kernel"]  # a repeated launch is kept once
    assert kernels[0][1] == SASS_HEADER and len(kernels[0][2]) == 5
    monkeypatch.setattr("sys.argv", ["ncu_phases.py", str(path), "--kernel", "data"])
    tool.main()
    lines = capsys.readouterr().out.splitlines()
    assert "deform_bwd_data_kernel" in lines[0] and "500 warp instructions, 100 stall samples" in lines[1]
    # One line per barrier, MMA, executed branch and exit, with running shares.
    shares = [(float(line.split()[1]), float(line.split()[2])) for line in lines[3:]]
    assert shares == [(40.0, 50.0), (80.0, 80.0), (90.0, 80.0), (100.0, 100.0)]


def _ktime_log(path, runs):
    """`ncu --csv --metrics gpu__time_duration.sum` output: kernels in launch order (ns)."""
    rows = [["ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"]]
    for kernel, ns in runs:
        rows.append([str(len(rows)), f"void deft::kern::{kernel}<float>(Geo)",
                     "gpu__time_duration.sum", "ns", f"{ns:,}"])
    path.write_text("==PROF== Connected to process\n" + _csv(rows))


def test_ktime_table_groups_runs_and_compares(tmp_path, capsys):
    tool = _load("ktime_table")
    before, after = tmp_path / "before.log", tmp_path / "after.log"
    # S2 backward (data pass, weight pass, a convert), then S4's forward.
    _ktime_log(before, [("deform_bwd_data_kernel", 500000), ("deform_bwd_weight_kernel", 240000),
                        ("convert_kernel", 25000), ("deform_fwd_ws_kernel", 113000)])
    _ktime_log(after, [("deform_bwd_data_kernel", 400000), ("deform_bwd_weight_kernel", 240000),
                       ("convert_kernel", 25000), ("deform_fwd_split_kernel", 90000)])
    tables = {}
    for name, log in (("before", before), ("after", after)):
        tool.main(str(log), ["S2,float32", "S4,float32,fwd"])
        tables[name] = tmp_path / f"{name}.md"
        tables[name].write_text(capsys.readouterr().out)
    assert tool.read_table(str(tables["before"])) == {
        "S2,float32": {"data": 500.0, "weight": 240.0, "other": 25.0, "total": 765.0},
        "S4,float32,fwd": {"fwd": 113.0, "total": 113.0}}
    tool.compare(str(tables["before"]), str(tables["after"]))
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "500.0 -> 400.0 (0.80x)" in rows["S2,float32"]
    assert "113.0 -> 90.0 (0.80x)" in rows["S4,float32,fwd"]
