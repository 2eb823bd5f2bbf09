"""examples/train.py's --check: non-finite losses and deform leaving deform_xla fail the run."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import train  # examples/train.py (conftest puts examples/ on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _results(deform, deform_xla, plain=None):
    out = {"deform": {"train_loss": list(deform)}, "deform_xla": {"train_loss": list(deform_xla)}}
    if plain is not None:
        out["plain"] = {"train_loss": list(plain)}
    return out


# A training-like curve: 2.3 falling to ~0.5 over 100 steps.
REF = 0.5 + 1.8 * np.exp(-np.arange(100) / 30.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_identical_curves_pass(dtype):
    failures, stats = train.check(_results(REF, REF, plain=REF + 0.1), dtype)
    assert failures == [] and stats["max_step_deviation"] == 0.0


def test_late_drift_within_the_final_tolerance_passes():
    # Rounding amplified by training: exact for 10 steps, then 5% of (1 + loss) apart.
    got = REF.copy()
    got[10:] += 0.05 * (1 + REF[10:])
    assert train.check(_results(got, REF), "float32")[0] == []


@pytest.mark.parametrize("dtype,early", [("float32", 2e-3), ("bfloat16", 2e-2)])
def test_early_deviation_fails_and_names_the_step(dtype, early):
    got = REF.copy()
    got[4] += early * (1 + REF[4])
    failures, _ = train.check(_results(got, REF), dtype)
    assert len(failures) == 1 and "at step 5" in failures[0] and dtype in failures[0]
    # Half the deviation is within the tolerance.
    got[4] = REF[4] + early / 4 * (1 + REF[4])
    assert train.check(_results(got, REF), dtype)[0] == []


def test_final_deviation_fails():
    got = REF.copy()
    got[-10:] += 0.2 * (1 + REF[-10:])
    failures, stats = train.check(_results(got, REF), "bfloat16")
    assert len(failures) == 1 and "final train loss" in failures[0]
    assert stats["final_deviation"] == pytest.approx(0.2)


def test_non_finite_loss_fails_for_any_model():
    bad = REF.copy()
    bad[7] = np.nan
    failures, _ = train.check(_results(REF, REF, plain=bad), "float32")
    assert failures == ["plain: train loss is not finite from step 8 (nan; 1 of 100 steps)"]
    failures, _ = train.check({"deform": {"train_loss": [2.3, np.inf, np.nan]}}, "float32")
    assert len(failures) == 1 and "deform" in failures[0] and "step 2" in failures[0]


def test_training_that_diverges_exits_non_zero(tmp_path):
    # A NaN learning rate turns every parameter NaN after the first update.
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--models", "plain", "--lr", "nan",
         "--steps", "2", "--eval-every", "2", "--width", "2", "--image-size", "8",
         "--num-train", "16", "--num-test", "8", "--batch", "8", "--timing-windows", "1",
         "--timing-steps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL: plain: train loss is not finite from step 2" in r.stdout, r.stdout
    assert list(tmp_path.glob("*.json")), "the record is written before the exit"


def test_deform_fused_is_checked_too():
    """Each native model (deform, deform_fused) is compared with deform_xla on its own."""
    bad = REF.copy()
    bad[3] += 0.5
    results = _results(REF, REF)
    results["deform_fused"] = {"train_loss": list(bad)}
    failures, stats = train.check(results, "float32")
    assert len(failures) == 1 and failures[0].startswith("deform_fused's train loss left")
    assert stats["max_step_deviation"] == 0.0 and stats["deform_fused_max_step_deviation"] > 0.1
