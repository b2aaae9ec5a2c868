"""``python -m gpulora phase --attention tensor``: the tensor sweep, its CSV and its three-panel PNG."""

import numpy as np
import pytest

from gpulora import cli
from gpulora.phase import read_csv
from gpulora.tensor import cost
from gpulora.tensor.phase import sweep


def test_tensor_sweep_points():
    pytest.importorskip("tqdm")
    points = sweep([0.5, 40.0], [16, 32], d_model=6, d_head=2, d_v=2, rank=1, time_max_L=16, error_max_L=16,
                   progress=False)
    assert [(p.bound, p.L) for p in points] == [(0.5, 16), (0.5, 32), (40.0, 16), (40.0, 32)]
    ok, far = points[0], points[2]
    assert ok.status == "ok" and ok.exact_source == "measured" and ok.poly_source == "measured"
    assert ok.grad_error is not None and ok.grad_error < 10 * ok.tol
    assert points[1].exact_source == "model" and points[1].grad_error is None
    assert far.status == "no_polynomial" and far.winner == "exact" and far.features is None
    assert ok.sqrt_log_L == pytest.approx(cost.log_threshold(16)) == pytest.approx(np.log(16) ** (1 / 3))
    assert ok.targets == "q,k1,k2,v1,v2"


def test_cli_phase_tensor_writes_png_and_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "tensor.png"
    rc = cli.main(["phase", "--attention", "tensor", "--out", str(out), "--bounds", "0.5,2", "--lengths", "16,64",
                   "--d-model", "6", "--d-head", "2", "--d-v", "2", "--rank", "1", "--time-max-L", "16",
                   "--error-max-L", "16", "--no-progress"])
    assert rc == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    rows = read_csv(tmp_path / "tensor.csv")
    assert len(rows) == 4 and {r["targets"] for r in rows} == {"q,k1,k2,v1,v2"}
    assert "wrote" in capsys.readouterr().out


def test_cost_model_orders():
    """Exact grows as L^3, poly linearly; targets cost only what they need."""
    assert cost.exact_flops(2048, 4, 4) / cost.exact_flops(1024, 4, 4) == pytest.approx(8)
    assert cost.poly_flops(2048, 4, 4, 35) / cost.poly_flops(1024, 4, 4, 35) == pytest.approx(2)
    assert cost.poly_flops(1024, 4, 4, 35, ("v1",)) < cost.poly_flops(1024, 4, 4, 35, ("q",))
    assert cost.exact_flops(1024, 4, 4, ()) < cost.exact_flops(1024, 4, 4, ("k2",))
