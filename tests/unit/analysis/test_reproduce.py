"""AG vs baseline end to end on the tiny config: both arms trained alike, report.md with its
table read back from the metrics files, and the plots."""

import json

import jax
import numpy as np
import pytest
from etils import epath

from conftest import REPO, write_corpus, write_keyword_csv
from guided_jax.analysis import reproduce
from guided_jax.config import load_config
from guided_jax.storage import copy_tree
from guided_jax.train.metrics import read_metrics
from guided_jax.weights.workdir import checkpoint_steps

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = 24


def _config(corpus):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(corpus)
    config.train.steps = STEPS
    config.train.eval_every = 6
    config.train.log_every = 2
    config.train.checkpoint_every = 12
    return config


def test_snapshot_steps():
    assert reproduce.snapshot_steps(1500) == {0.0: 0, 0.01: 15, 1.0: 1500}
    assert reproduce.snapshot_steps(24) == {0.0: 0, 0.01: 1, 1.0: 24}


def test_arms_differ_only_in_guidance(tmp_path):
    config = _config(tmp_path / "c.txt")
    baseline, ag = (json.loads(reproduce.arm_config(config, a).to_json()) for a in reproduce.ARMS)
    assert baseline["guidance"].pop("enabled") is False and ag["guidance"].pop("enabled") is True
    assert baseline == ag and ag["train"]["keep_steps"] == "1%,100%"
    with pytest.raises(ValueError, match="arm must be one of"):
        reproduce.arm_config(config, "other")


@pytest.mark.slow
def test_reproduce_on_epochs_keeps_and_plots_the_steps_counted_from_them(tmp_path):
    """The kept checkpoints, the grids and the report follow the steps the run counted from
    train.epochs."""
    workdir = tmp_path / "compare"
    config = _config(write_corpus(tmp_path / "corpus.txt", lines=60))
    config.train.update(steps=0, epochs=2.0, eval_every=4, checkpoint_every=0)
    reproduce.train_arms(config, workdir, devices=jax.devices()[:1])
    total = json.loads((workdir / "ag" / "config.json").read_text())["train"]["steps"]
    assert 10 < total < 1000 and read_metrics(workdir / "ag")[-1]["step"] == total
    early = max(1, round(total / 100))
    for arm in reproduce.ARMS:
        assert checkpoint_steps(workdir / arm) == [early, total]
    report = reproduce.write_report(workdir, config).read_text()
    assert f"and steps ({total})" in report
    for arm in reproduce.ARMS:
        for step in (0, early, total):
            name = f"attention_{arm}_step{step}.png"
            assert (workdir / name).read_bytes().startswith(PNG) and f"({name})" in report


def test_steps_to_reach():
    curve = [(6, 5.0), (12, 4.2), (18, 4.0)]
    assert reproduce.steps_to_reach(curve, 4.2) == 12
    assert reproduce.steps_to_reach(curve, 3.0) is None


def _table(report: str) -> dict[str, list[str]]:
    """report.md's first table: row title -> cells."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_reproduce_writes_a_report_whose_numbers_come_from_the_metrics(tmp_path, gcs_dir):
    workdir = tmp_path / "compare"
    config = _config(write_corpus(tmp_path / "corpus.txt"))
    reproduce.train_arms(config, workdir, devices=jax.devices()[:1])
    saved = {a: json.loads((workdir / a / "config.json").read_text()) for a in reproduce.ARMS}
    assert saved["baseline"]["guidance"].pop("enabled") is False
    assert saved["ag"]["guidance"].pop("enabled") is True
    assert saved["baseline"] == saved["ag"]
    for arm in reproduce.ARMS:  # 1% of training kept beside the newest two
        assert checkpoint_steps(workdir / arm) == [1, 12, 24]

    # A second call finds both arms finished, fine-tunes each on a CSV task and writes the report.
    train_csv = write_keyword_csv(tmp_path / "train.csv", 64, 0)
    eval_csv = write_keyword_csv(tmp_path / "eval.csv", 32, 1)
    finetune_config = load_config(str(REPO / "configs" / "finetune.py"))
    finetune_config.data.update(train_file=str(train_csv), eval_file=str(eval_csv))
    finetune_config.update(seeds="1,2", epochs=1, learning_rates="1e-3", max_length=16)
    before = {a: (workdir / a / "metrics.jsonl").read_text() for a in reproduce.ARMS}
    path = reproduce.reproduce(
        config, workdir, finetune_config=finetune_config, devices=jax.devices()[:1]
    )
    assert path == workdir / "report.md"
    assert {a: (workdir / a / "metrics.jsonl").read_text() for a in reproduce.ARMS} == before

    report = (workdir / "report.md").read_text()
    table = _table(report)
    finals = {}
    for arm in reproduce.ARMS:
        records = read_metrics(workdir / arm)
        last_eval = [r for r in records if r.get("eval_mlm_loss") is not None][-1]
        last_train = [r for r in records if r.get("mlm_loss") is not None][-1]
        finals[arm] = last_eval["eval_mlm_loss"]
        column = reproduce.ARMS.index(arm)
        assert last_eval["step"] == STEPS
        row = table[f"final eval MLM loss (step {STEPS} / {STEPS})"]
        assert row[column] == f"{last_eval['eval_mlm_loss']:.4f}"
        assert table["final train MLM loss"][column] == f"{last_train['mlm_loss']:.4f}"
        assert table["final eval AG loss"][column] == f"{last_eval['eval_ag_loss']:.4f}"
    ag_curve = [
        (r["step"], r["eval_mlm_loss"])
        for r in read_metrics(workdir / "ag")
        if r.get("eval_mlm_loss") is not None
    ]
    reach = next((s for s, v in ag_curve if v <= finals["baseline"]), None)
    cell = table["steps to reach the baseline's final eval MLM loss"]
    assert cell[0] == str(STEPS)
    assert cell[1].split(" ")[0] == (str(reach) if reach is not None else "not")
    summary = json.loads((workdir / "report.json").read_text())
    assert summary["ag_steps_to_baseline_final"] == reach
    assert summary["arms"]["baseline"]["final_eval_mlm_loss"] == finals["baseline"]

    tuned = {
        a: json.loads((workdir / f"finetune_{a}" / "results.json").read_text())
        for a in reproduce.ARMS
    }
    short = [r["seed"] for a in reproduce.ARMS for r in tuned[a]["runs"] if r["cut_short"]]
    doubt = " (not conclusive: cut short)" if short else ""
    assert ("**Not conclusive**" in report) is bool(short)
    assert summary["finetune_conclusive"] is not short
    assert table["train: learning rate, chosen on validation per arm"] == ["0.001", "0.001"]
    for arm, results in tuned.items():
        assert results["pretrained_step"] == STEPS and len(results["runs"]) == 2
        for metric in ("accuracy", "macro_f1", "mcc"):
            m = results["metrics"][metric]
            cells = table[f"train: eval {metric} (mean ± std){doubt}"]
            assert cells[reproduce.ARMS.index(arm)] == f"{m['mean']:.4f} ± {m['std']:.4f}"
    for metric in ("accuracy", "macro_f1", "mcc"):  # seed by seed, computed here
        by_seed = [{r["seed"]: r["eval"][metric] for r in tuned[a]["runs"]} for a in reproduce.ARMS]
        diffs = np.array([by_seed[1][s] - by_seed[0][s] for s in (1, 2)])
        cells = table[f"train: eval {metric}, AG - baseline paired by seed (mean ± std over 2)"
                      f"{doubt}"]  # fmt: skip
        assert cells == ["", f"{diffs.mean():.4f} ± {diffs.std(ddof=1):.4f}"]

    pictures = ["mlm_loss.png", "ag_loss.png", "finetune_validation.png"] + [
        f"attention_{arm}_step{step}.png" for arm in reproduce.ARMS for step in (0, 1, STEPS)
    ]
    for name in pictures:
        assert (workdir / name).read_bytes().startswith(PNG), name
        assert f"({name})" in report

    # The same arms in a gs:// workdir give the same report, written there.
    for arm in reproduce.ARMS:
        copy_tree(workdir / arm, f"{gcs_dir}/{arm}")
    tuned.update(task=tuned["ag"]["task"], seeds=2)
    remote = reproduce.write_report(gcs_dir, config, finetune=tuned)
    assert str(remote) == f"{gcs_dir}/report.md"
    assert remote.read_text() == report
    assert json.loads(epath.Path(gcs_dir, "report.json").read_text()) == summary
    for name in pictures:
        assert epath.Path(gcs_dir, name).read_bytes().startswith(PNG), name
