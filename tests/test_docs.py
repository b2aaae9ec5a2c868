"""The committed docs stay true to the code: docs/phase.csv and docs/phase.png (from
``python -m gpulora phase --out docs/phase.png``), README's boundary sentence, and the citations of
docs/math.md. Measured wall times are not rechecked (they vary with the load); everything the code decides
without a clock is."""

import hashlib
import math
import pathlib
import re
import struct
import subprocess

import numpy as np
import pytest

from gpulora import cost
from gpulora.phase import (DEFAULT_BOUNDS, DEFAULT_LENGTHS, _model_seconds, _poly_choice, boundary_text,
                           read_points)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "phase.csv"
PNG = ROOT / "docs" / "phase.png"
README = (ROOT / "README.md").read_text()
MATH = (ROOT / "docs" / "math.md").read_text()


@pytest.fixture(scope="module")
def points():
    return read_points(CSV)


def _png_text(path):
    """The tEXt chunks of a PNG, as a dict."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    return out


def test_png_shows_the_committed_csv():
    source = _png_text(PNG).get("Source", "")
    assert source == f"gpulora phase; csv sha256 {hashlib.sha256(CSV.read_bytes()).hexdigest()}", source


def test_csv_is_the_documented_default_sweep(points):
    assert sorted({p.bound for p in points}) == sorted(DEFAULT_BOUNDS)
    assert sorted({p.L for p in points}) == list(DEFAULT_LENGTHS)
    assert len(points) == len(DEFAULT_BOUNDS) * len(DEFAULT_LENGTHS)
    p0 = points[0]
    assert (p0.d_head, p0.d_v, p0.d_model, p0.rank, p0.targets, p0.dtype, p0.tol) == (4, 4, 32, 8, "qkv",
                                                                                     "float32", 1e-3)
    assert all(p.status != "failed" for p in points)


def test_every_decision_without_a_clock_matches_the_code(points):
    """The polynomial of every M, the modelled times and every model-decided winner, as the code gives them now."""
    for p in points:
        choice, compute, status = _poly_choice(p.bound, p.tol, np.dtype(p.dtype))
        assert p.status == status, p
        k = None if choice is None else choice.features(p.d_head)
        assert (p.family, p.degree, p.features) == ((None, None, None) if choice is None else
                                                    (choice.family, choice.degree, k)), p
        assert p.compute_dtype == (None if compute is None else np.dtype(compute).name), p
        if choice is not None:
            for got, want in ((p.approx_error, choice.approx_error), (p.rounding_error, choice.rounding_error(compute)),
                              (p.rounding_error_float32, choice.rounding_error(np.float32)),
                              (p.rounding_error_float64, choice.rounding_error(np.float64))):
                assert math.isclose(got, want, rel_tol=1e-9), p
        upcast = compute is not None and np.dtype(compute) != np.dtype(p.dtype)
        te, tp = _model_seconds(p.L, p.d_head, p.d_v, k, p.targets, p.backend, upcast)
        if p.exact_source == "model":
            assert math.isclose(p.exact_seconds, te, rel_tol=1e-9), p
        if p.poly_source == "model":
            assert math.isclose(p.poly_seconds, tp, rel_tol=1e-9), p
        if p.basis == "model":
            assert p.winner == ("poly" if tp < te else "exact"), p
        assert math.isclose(p.sqrt_log_L, cost.log_threshold(p.L)) and math.isclose(p.log_L, math.log(p.L))


def test_readme_boundary_sentence_is_the_csv(points):
    m = re.search(r"<!-- phase-boundary -->(.*?)<!-- /phase-boundary -->", README, flags=re.S)
    assert m, "README lacks the marked boundary sentence"
    assert " ".join(m.group(1).split()) == boundary_text(points) + "."


def _tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: no git
        names = "\n".join(str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file())
    keep = (".py", ".md", ".toml", ".json", ".txt", ".cfg", ".in")
    return [ROOT / n for n in names.splitlines() if n.endswith(keep) and (ROOT / n).is_file()
            and "results" not in n]


def test_citations_point_into_docs_math():
    """Code and docs cite docs/math.md by section number (1..7); no document the project does not ship."""
    headings = {int(n) for n in re.findall(r"^## (\d)\. ", MATH, flags=re.M)}
    assert headings == set(range(1, 8))
    for path in _tracked_text_files():
        if path.resolve() == pathlib.Path(__file__).resolve():  # this test names the words it forbids
            continue
        text = path.read_text(errors="replace")
        for word in ("SPEC section", "SPEC-", "STYLE item", "SPEC.md", "STYLE.md"):
            assert word not in text, (path, word)
        for n in re.findall(r"docs/math\.md sections? (\d)", text):
            assert int(n) in headings, (path, n)
