"""benchmarks/tpu_fit.py on one small cell (configs/tiny.py on v5e:2x2, dense, batches 4 and 8):
its table holds XLA:TPU's numbers in the slice's column, they agree with a direct compile, and
a second run reads its cache instead of compiling; the batch search doubles, halves and stops
where it should."""

import dataclasses
import importlib.util
import json
import re
import sys

import pytest

from conftest import REPO
from guided_jax.config import load_config
from guided_jax.train.lowering import TPU_CHIPS, compile_for_topology

SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def _script():
    """benchmarks/tpu_fit.py as a module (imported once: its dataclasses need sys.modules)."""
    if "tpu_fit" not in sys.modules:
        path = REPO / "benchmarks" / "tpu_fit.py"
        spec = importlib.util.spec_from_file_location("tpu_fit", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["tpu_fit"] = module
        spec.loader.exec_module(module)
    return sys.modules["tpu_fit"]


def _table_row(markdown: str, title: str, preset: str) -> dict[str, str]:
    """The cells of ``preset``'s row in the table under ``## title``, by column header."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ")
    ]
    header, *body = rows
    (row,) = [r for r in body if r[0].split(" (")[0] == preset]
    return dict(zip(header, row, strict=True))


def _direct(batch: int):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.model.update(dtype="bfloat16", attention="dense")
    config.train.per_device_batch_size = batch
    return compile_for_topology(config, "v5e:2x2")


def test_one_cell_is_compiled_tabled_and_cached(tmp_path, monkeypatch):
    fit = _script()
    cache, out = tmp_path / "cache", tmp_path / "TPU.md"
    argv = [
        "--presets=configs/tiny.py", "--topologies=v5e:2x2", "--attentions=dense",
        "--max_batch=8", "--block_size=0", f"--cache={cache}", f"--out={out}",
    ]  # fmt: skip
    assert fit.main(argv) == 0
    # 4 fits, 8 fits and is the cap: two compiles.
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"configs_tiny.py__v5e-2x2__dense__b{b}__nconfig.json" for b in (4, 8)]
    records = {b: json.loads((cache / files[i]).read_text()) for i, b in enumerate((4, 8))}

    direct = _direct(8)
    compiled = records[8]["compiled"]
    assert compiled["train"] == dataclasses.asdict(direct.train)
    assert compiled["eval"] == dataclasses.asdict(direct.eval)
    assert compiled["train_flops"] == direct.train_flops > 0
    assert (compiled["per_device_batch"], compiled["block_size"]) == (8, 32)
    assert records[8]["per_chip_gib"] == pytest.approx(direct.per_chip_gib)

    markdown = out.read_text()
    assert "compiler estimates" in markdown and "projection" in markdown
    row = _table_row(markdown, "Dense attention", "configs/tiny.py")
    assert row["preset"] == "configs/tiny.py (n=32)"
    (column,) = [h for h in row if h.startswith("v5e:2x2 ")]
    assert column == "v5e:2x2 (4 chips, 16 GiB)"
    assert all(text == "—" for header, text in row.items() if header not in ("preset", column))
    first, best = row[column].split("<br>")

    match = re.fullmatch(r"b4: ([\d.]+) GiB, ([\d.]+) (\w?)FLOP", first)
    assert match, first
    assert float(match[1]) == pytest.approx(records[4]["per_chip_gib"], rel=5e-3)
    assert float(match[2]) * SCALE[match[3]] == pytest.approx(
        records[4]["compiled"]["train_flops"], rel=5e-3
    )

    pattern = r"\*\*max\*\* b8: ([\d.]+) GiB, ([\d.]+) (\w?)FLOP \(cap\), ([\d.]+)(\w?) tokens/s"
    match = re.fullmatch(pattern, best)
    assert match, best
    assert float(match[1]) == pytest.approx(direct.per_chip_gib, rel=5e-3)
    flops_per_chip = direct.train_flops * direct.cores_per_chip
    assert float(match[2]) * SCALE[match[3]] == pytest.approx(flops_per_chip, rel=5e-3)
    # One core per v5e chip, every chip splits the batch: 8 x 32 tokens per chip and step.
    step_s = flops_per_chip / (0.4 * TPU_CHIPS["v5e"][1])
    assert float(match[4]) * SCALE[match[5]] == pytest.approx(8 * 32 / step_s, rel=5e-3)

    # A second run compiles nothing: the cache answers, untouched, and the table is the same.
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again despite the cache")

    monkeypatch.setattr(fit, "compile_for_topology", no_compile)
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    out.unlink()
    assert fit.main(argv) == 0
    assert out.read_text() == markdown
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps

    # Pallas cells project from the dense FLOPs: the measured batch, or the line through the
    # two nearest.
    cell = fit.Cell("configs/tiny.py", "v5e:2x2", "pallas", 0)
    assert fit.dense_flops(cell, cache, 8) == (direct.train_flops, False)
    f4, f8 = (records[b]["compiled"]["train_flops"] for b in (4, 8))
    flops, extrapolated = fit.dense_flops(cell, cache, 16)
    assert extrapolated and flops == pytest.approx(f8 + (f8 - f4) * (16 - 8) / (8 - 4))


@pytest.mark.parametrize(
    ("largest", "max_batch", "best", "tried", "capped"),
    [
        (32, 256, 32, [4, 8, 16, 32, 64], False),  # doubles until 64 does not fit
        (256, 64, 64, [4, 8, 16, 32, 64], True),  # stopped by the cap
        (1, 256, 1, [4, 2, 1], False),  # halves below 4
        (0, 256, None, [4, 2, 1], False),  # nothing fits
        (8, 2, 2, [2], True),  # a cap below 4 starts there
    ],
)
def test_the_batch_search(monkeypatch, largest, max_batch, best, tried, capped):
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda record: record["batch"] <= largest)
    found = fit.search(lambda batch: {"batch": batch}, max_batch)
    assert (found.best, list(found.records), found.finished, found.capped) == (
        best, tried, True, capped,
    )  # fmt: skip


def test_a_search_the_cache_cannot_finish_is_unfinished(monkeypatch):
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda record: True)
    found = fit.search(lambda batch: {"batch": batch} if batch <= 8 else None, 256)
    assert (found.best, list(found.records), found.finished) == (8, [4, 8], False)


def test_the_committed_table_is_what_the_script_writes_from_the_committed_cache(tmp_path):
    """docs/TPU.md holds the script's own table: rewritten from benchmarks/tpu_fit_cache with
    the command the document gives, it is unchanged."""
    out = tmp_path / "TPU.md"
    assert _script().main(["--max_batch", "4", "--no_compile", f"--out={out}"]) == 0
    assert out.read_text() == (REPO / "docs" / "TPU.md").read_text()
