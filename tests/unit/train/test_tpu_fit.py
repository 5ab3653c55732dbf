"""benchmarks/tpu_fit.py on one small cell (configs/tiny.py on v5e:2x2, dense, batches 4 and 8,
and 4 with the state sharded 4 ways): its tables hold XLA:TPU's numbers in the slice's column,
they agree with a direct compile, and a second run reads its cache instead of compiling; worker
processes fill the same cache; the batch search predicts, bisects, halves and stops where it
should."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from guided_jax.config import load_config
from guided_jax.train.lowering import TPU_CHIPS, compile_for_topology

TABLES = ("Dense attention", "Pallas attention")
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


def _tiny_rows(markdown: str) -> dict[str, dict[str, str]]:
    return {title: _table_row(markdown, title, "configs/tiny.py") for title in TABLES}


def _direct(batch: int):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.model.update(dtype="bfloat16", attention="dense")
    config.train.per_device_batch_size = batch
    return compile_for_topology(config, "v5e:2x2")


def test_one_cell_is_compiled_tabled_and_cached(tmp_path, monkeypatch):
    fit = _script()
    # The fsdp comparison on the same small cell: the state replicated, then sharded 4 ways.
    monkeypatch.setattr(fit, "FSDP_TOPOLOGY", "v5e:2x2")
    monkeypatch.setattr(fit, "FSDP_PRESETS", ("configs/tiny.py",))
    monkeypatch.setattr(fit, "FSDP_SIZES", (1, 4))
    cache, out = tmp_path / "cache", tmp_path / "TPU.md"
    argv = [
        "--presets=configs/tiny.py", "--topologies=v5e:2x2", "--attentions=dense",
        "--max_batch=8", "--block_size=0", f"--cache={cache}", f"--out={out}",
    ]  # fmt: skip
    assert fit.main(argv) == 0
    # 4 fits, 8 fits and is the cap: two compiles; and 4 with the state sharded 4 ways.
    files = sorted(p.name for p in cache.iterdir())
    name = "configs_tiny.py__v5e-2x2__dense__b{}__nconfig{}.json"
    assert files == [name.format(4, ""), name.format(4, "__fsdp4"), name.format(8, "")]
    records = {b: json.loads((cache / name.format(b, "")).read_text()) for b in (4, 8)}
    sharded = json.loads((cache / name.format(4, "__fsdp4")).read_text())
    assert sharded["compiled"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}

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

    section = markdown.split("## Sharding the state: fsdp on v5e:2x2\n", 1)[1]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    gib = {}
    for preset, mesh, arguments, *_ in rows[1:]:
        assert preset.strip() == "configs/tiny.py"
        gib[mesh.strip()] = float(arguments.strip().removesuffix(" GiB"))
    assert gib.keys() == {"data 4", "fsdp 4"}
    for mesh, record in (("data 4", records[4]), ("fsdp 4", sharded)):
        assert gib[mesh] == pytest.approx(record["compiled"]["train"]["arguments"] / 2**30, 5e-3)
    assert gib["fsdp 4"] < gib["data 4"]  # each chip holds a quarter of the state, padded

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


def _linear(batch: int) -> float:
    return 1 + 0.5 * batch  # GiB: fits 16 GiB up to a batch of 30


def _roomy(batch: int) -> float:
    return 1 + 0.01 * batch  # fits 16 GiB up to 1,500


def _quadratic(batch: int) -> float:
    return 1 + 0.01 * batch + 0.001 * batch**2  # fits up to 119; the line through 4, 8 says 683


@pytest.mark.parametrize(
    ("gib", "largest", "max_batch", "guess", "best", "tried", "capped"),
    [
        (_linear, 30, 256, None, 16, [4, 8, 16, 32], False),  # predicted right, 2x does not fit
        (_roomy, 1500, 256, None, 256, [4, 8, 256], True),  # predicted past the cap: the cap
        (_roomy, 1500, 2048, None, 1024, [4, 8, 1024, 2048], False),
        (_quadratic, 119, 1024, None, 64, [4, 8, 512, 64, 128], False),  # too far: bisected back
        (_linear, 100, 256, None, 64, [4, 8, 16, 32, 64, 128], False),  # too short: doubled on
        (_linear, 4, 256, None, 4, [4, 8], False),  # 8 refused by the compiler
        (_linear, 1, 256, None, 1, [4, 2, 1], False),  # halves below 4
        (_linear, 0, 256, None, None, [4, 2, 1], False),  # nothing fits
        (_linear, 8, 2, None, 2, [2], True),  # a cap below 4 starts there
        # The same chip's largest batch in another slice, tried in place of 8:
        (_linear, 30, 256, 16, 16, [4, 16, 32], False),  # right: its double does not fit
        (_quadratic, 119, 1024, 128, 64, [4, 128, 16, 32, 64], False),  # too large: bisected
        (_linear, 100, 256, 32, 64, [4, 32, 64, 128], False),  # too small: the line goes on
        (_roomy, 1500, 256, 256, 256, [4, 256], True),  # the cap
        (_linear, 30, 256, 4, 16, [4, 8, 16, 32], False),  # not above 4: 8 as without one
    ],
)
def test_the_batch_search(monkeypatch, gib, largest, max_batch, guess, best, tried, capped):
    """Records fit up to ``largest``; the prediction sees ``gib`` of a 16 GiB chip (a compile
    the compiler refused has no memory). The records alone, in any order, settle the same
    verdict (the table reads them so)."""
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda record: record["batch"] <= largest)
    monkeypatch.setattr(
        fit, "memory", lambda r: (gib(r["batch"]), 16.0) if r["batch"] <= max(largest, 4) else None
    )
    found = fit.search(
        lambda batch: {"batch": batch}, max_batch, None if guess is None else lambda _: guess
    )
    assert (found.best, list(found.records), found.finished, found.capped) == (
        best, tried, True, capped,
    )  # fmt: skip
    records = dict(reversed(found.records.items()))
    settled = fit.settled(records, max_batch)
    assert (settled.best, settled.finished, settled.capped) == (best, True, capped)
    for batch in tried[1:]:  # without any one of them, unfinished (where it was needed)
        rest = {b: r for b, r in records.items() if b != batch}
        if batch == 2 * (best or 0) or (best is None and batch == 1):
            assert not fit.settled(rest, max_batch).finished


def test_the_guess_comes_from_the_same_chip_else_from_another_chips_growth(tmp_path, monkeypatch):
    """A pod slice's search tries the 4-chip slice's largest batch (same chip); another
    generation's finished search gives its memory growth per example per device, which this
    chip's memory at 4 extends to its own HBM (a v4 chip holds two devices); an unfinished
    search gives nothing."""
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda r: r["gib"] <= r["hbm"])
    monkeypatch.setattr(fit, "memory", lambda r: (r["gib"], r["hbm"]))
    monkeypatch.setattr(fit, "devices_per_chip", lambda r: r["cores"])

    def record(batch: int, gib: float, hbm: float, cores: int = 1) -> dict:
        return {"per_device_batch": batch, "gib": gib, "hbm": hbm, "cores": cores}

    def cache(topology: str, records: list[dict]) -> None:
        cell = fit.Cell("roberta_4", topology, "dense", 512)
        for r in records:
            cell.file(tmp_path, r["per_device_batch"]).write_text(json.dumps(r))

    def guess(topology: str, start: dict) -> int | None:
        found = fit.guess_for(fit.Cell("roberta_4", topology, "dense", 512), tmp_path, 256)
        return None if found is None else found(start)

    assert guess("v5e:16x16", record(4, 12, 16)) is None  # nothing measured
    # v5e:2x2 unfinished: 16 fits (1 + 0.5 GiB per example), 32 not compiled
    cache("v5e:2x2", [record(b, 1 + 0.5 * b, 16) for b in (4, 8, 16)])
    assert guess("v5e:16x16", record(4, 12, 16)) is None
    cache("v5e:2x2", [record(32, 17, 16)])  # finished: 16, what the same chip fits
    assert guess("v5e:16x16", record(4, 12, 16)) == 16
    # Other chips grow by 0.5 GiB per example per device from their own memory at 4:
    # v6e: 3 + 0.5 (b - 4) <= 32 up to b = 62; v4 (2 devices): 6 + 1.0 (b - 4) <= 32 up to 30
    assert guess("v6e:2x2", record(4, 3, 32)) == 32
    assert guess("v4:2x2x1", record(4, 6, 32, cores=2)) == 16
    assert guess("v5p:2x2x1", record(4, 3, 95)) == 128


def test_a_v4_search_gives_the_growth_per_device(tmp_path, monkeypatch):
    """v4's records are per chip of two devices: 6 and 10 GiB at 4 and 8 per device is 0.5 GiB
    per example per device, so v5p (one device per chip) reaches 3 + 0.5 (b - 4) <= 95."""
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda r: r["gib"] <= r["hbm"])
    monkeypatch.setattr(fit, "memory", lambda r: (r["gib"], r["hbm"]))
    monkeypatch.setattr(fit, "devices_per_chip", lambda r: r["cores"])
    v4 = fit.Cell("roberta_4", "v4:2x2x1", "dense", 512)
    for batch, gib in ((4, 6), (8, 10), (16, 33)):
        record = {"per_device_batch": batch, "gib": gib, "hbm": 32, "cores": 2}
        v4.file(tmp_path, batch).write_text(json.dumps(record))
    found = fit.guess_for(fit.Cell("roberta_4", "v5p:2x2x1", "dense", 512), tmp_path, 256)
    assert found is not None
    assert found({"per_device_batch": 4, "gib": 3, "hbm": 95, "cores": 1}) == 128


def test_a_search_the_cache_cannot_finish_is_unfinished(monkeypatch):
    fit = _script()
    monkeypatch.setattr(fit, "fits", lambda record: True)
    monkeypatch.setattr(fit, "memory", lambda record: (_linear(record["batch"]), 16.0))
    found = fit.search(lambda batch: {"batch": batch} if batch <= 8 else None, 256)
    assert (found.best, list(found.records), found.finished) == (8, [4, 8], False)


def test_worker_processes_fill_the_cache_the_table_is_written_from(tmp_path, monkeypatch, capfd):
    """--jobs 2: the dense and Pallas cells compile at once, each in a worker process (this
    process cannot compile here), both writing the dense batch the Pallas projection needs;
    the cache they leave holds every record, complete, for the table. A worker the system
    kills (as for memory) fails its own cell only: the others go on."""
    fit = _script()

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled in the parent process")

    monkeypatch.setattr(fit, "compile_for_topology", no_compile)
    killed = tmp_path / "killed.py"
    killed.write_text(
        "import os, signal\n\n\ndef get_config():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    cache, out = tmp_path / "cache", tmp_path / "TPU.md"
    argv = [
        "--presets=configs/tiny.py", "--topologies=v5e:2x2", "--attentions=dense,pallas",
        "--max_batch=4", "--block_size=0", f"--cache={cache}", f"--out={out}",
    ]  # fmt: skip
    assert fit.main([*argv, f"--presets={killed},configs/tiny.py", "--jobs=2"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert sorted(errors) == [
        f"error: {killed} on v5e:2x2, {attention}: worker process killed by SIGKILL (out of "
        "memory, say: fewer --jobs leave each compile more); its finished compiles are cached"
        for attention in ("dense", "pallas")
    ]
    files = sorted(p.name for p in cache.iterdir())
    name = "configs_tiny.py__v5e-2x2__{}__b4__nconfig.json"
    assert files == [name.format("dense"), name.format("pallas")]  # no partial file left
    for attention in ("dense", "pallas"):
        record = json.loads((cache / name.format(attention)).read_text())
        assert record["status"] == "ok" and record["compiled"]["attention"] == attention
    markdown = out.read_text()
    rows = _tiny_rows(markdown)
    assert rows["Pallas attention"]["v5e:2x2 (4 chips, 16 GiB)"].startswith("**max** b4")
    assert _table_row(markdown, "Dense attention", str(killed))["v5e:2x2 (4 chips, 16 GiB)"] == "—"
    assert f"* {errors[0].removeprefix('error: ')}" in markdown  # the table says why
    out.unlink()
    assert fit.main(argv) == 0  # in this process, from the cache alone
    rewritten = out.read_text()  # the killed cells' rows and failures aside, the same table
    assert rewritten.split("\n## ")[0] == markdown.split("\n## ")[0]
    assert _tiny_rows(rewritten) == rows


def test_a_compile_records_the_commit_its_process_started_from(monkeypatch):
    """The checkout may change under a run of hours: its records name the commit, clean or
    not, the code was imported from, not the checkout's state when each compile ends."""
    fit = _script()
    tree = {"HEAD": "abc1234\n", "status": ""}

    def git(argv, **kwargs):
        out = tree["HEAD"] if argv[1] == "rev-parse" else tree["status"]
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    monkeypatch.setattr(fit.subprocess, "run", git)
    fit.code_commit.cache_clear()
    try:
        assert fit._provenance()["commit"] == "abc1234"
        tree.update(HEAD="def5678\n", status=" M guided_jax/train/loop.py\n")
        assert fit._provenance()["commit"] == "abc1234"
        fit.code_commit.cache_clear()  # a new process
        assert fit._provenance()["commit"] == "def5678 with uncommitted changes"
    finally:
        fit.code_commit.cache_clear()


def test_the_committed_table_is_what_the_script_writes_from_the_committed_cache(tmp_path):
    """docs/TPU.md holds the script's own table: rewritten from benchmarks/tpu_fit_cache with
    the command the document gives, it is unchanged."""
    out = tmp_path / "TPU.md"
    assert _script().main(["--no_compile", f"--out={out}"]) == 0
    assert out.read_text() == (REPO / "docs" / "TPU.md").read_text()
