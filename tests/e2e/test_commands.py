"""Every documented ``python -m guided_jax.X`` command, run as a user runs it (a fresh process):
its ``--help``, its README example on tiny inputs, and its one-line errors. Pretraining's own
runs (resume, signals, kill -9) are in test_main.py, the README's default job in
test_default_job.py; the AG-vs-baseline report, which trains two arms, runs in-process in
tests/unit/analysis/test_reproduce.py."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO, cli_env, write_corpus, write_keyword_csv

HF_ROBERTA = REPO / "tests" / "fixtures" / "hf" / "roberta"  # as transformers saves a model

COMMANDS = (
    "main",
    "finetune",
    "reproduce",
    "benchmark",
    "visualize",
    "diagnostics",
    "probe",
    "hf_interop",
    "tokenizer",
    "anaphora",
    "lower",
    "prepare",
)


def _run(command: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"guided_jax.{command}", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _one_line_error(result: subprocess.CompletedProcess, command: str, *names: str) -> str:
    """A failed command says what is wrong in one line naming the culprit, no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"guided_jax.{command}: error: "), line
    for name in names:
        assert name in line, line
    return line


def test_the_readme_documents_exactly_these_commands():
    documented = set(re.findall(r"python -m guided_jax\.(\w+)", (REPO / "README.md").read_text()))
    assert documented == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_commands_flags(command):
    result = _run(command, "--help", timeout=120)
    assert "Traceback" not in result.stderr
    # absl prints the module docstring and the command's own flags (and exits with 1).
    assert f"python -m guided_jax.{command}" in result.stdout
    assert f"guided_jax/{command}.py:" in result.stdout


def test_anaphora_prints_sentences_as_json_lines():
    lines = _ok(_run("anaphora", "--count", 5, "--variant", "distractor")).splitlines()
    examples = [json.loads(line) for line in lines]
    assert len(examples) == 5
    assert all(e["distractor"] is not None for e in examples)
    assert _one_line_error(_run("anaphora", "--count", 0), "anaphora", "positive")


def test_tokenizer_trains_from_several_files_and_refuses_bad_ones(tmp_path):
    first = write_corpus(tmp_path / "a.txt", lines=200, seed=1)
    second = write_corpus(tmp_path / "b.txt", lines=200, seed=2)
    out = tmp_path / "tok"
    stdout = _ok(_run("tokenizer", "--files", first, second, "--vocab_size", 350, "--out", out))
    assert "(bpe, vocab size 350, trained on 400 documents)" in stdout
    assert {p.name for p in out.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json"}

    wordpiece = tmp_path / "wp"
    args = ("--kind", "wordpiece", "--lowercase", "--files", first, "--vocab_size", 150)
    _ok(_run("tokenizer", *args, "--out", wordpiece))
    config = json.loads((wordpiece / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "BertTokenizer", "do_lower_case": True}

    missing = tmp_path / "missing.txt"
    result = _run("tokenizer", "--files", missing, "--vocab_size", 300, "--out", tmp_path / "x")
    _one_line_error(result, "tokenizer", "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    result = _run("tokenizer", "--files", latin1, "--vocab_size", 300, "--out", tmp_path / "x")
    _one_line_error(result, "tokenizer", "latin1.txt", "UTF-8")
    assert not (tmp_path / "x").exists()
    result = _run("tokenizer", "--files", first, "--vocab_size", 100, "--out", tmp_path / "x")
    _one_line_error(result, "tokenizer", "vocab_size")
    result = _run("tokenizer", "--files", first, "--lowercase", "--vocab_size", 300, "--out", out)
    _one_line_error(result, "tokenizer", "lowercase")
    stdout = _ok(
        _run("tokenizer", "--default_corpus", "--vocab_size", 300, "--out", tmp_path / "d")
    )
    assert int(re.search(r"trained on (\d+) documents", stdout)[1]) > 1000
    # One of --files and --default_corpus, not both, not neither.
    for both_or_neither in (("--default_corpus", "--files", first), ()):
        result = _run("tokenizer", *both_or_neither, "--vocab_size", 300, "--out", tmp_path / "y")
        assert result.returncode == 2 and "--files or --default_corpus" in result.stderr
        assert not (tmp_path / "y").exists()
    # Flags are spelt with underscores, as in every command; the hyphenated spelling is refused.
    result = _run("tokenizer", "--default_corpus", "--vocab-size", 300, "--out", tmp_path / "z")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Unknown command line flag 'vocab-size'" in result.stderr, result.stderr
    assert not (tmp_path / "z").exists()


def test_lower_prints_what_it_lowered_and_refuses_what_cannot_run():
    args = ("--config", "configs/tiny.py", "--platform", "tpu", "--config.model.attention=pallas")
    lines = _ok(_run("lower", *args)).strip().splitlines()
    assert lines[0] == "train step of attention=pallas on 1 x TPU v5 lite"
    assert "mosaic (TPU Pallas) 6" in lines[1] and lines[2].startswith("StableHLO: ")
    assert lines[-1] == "lowered platform=tpu attention=pallas ok"
    result = _run("lower", *args, "--config.data.document_masks=true")
    _one_line_error(result, "lower", "document_masks", "pallas")


def test_visualize_draws_a_chosen_step(tiny_run, tmp_path):
    out = tmp_path / "grid.png"
    args = ("--workdir", tiny_run, "--text", "The cat sat on the mat.", "--step", 0)
    stdout = _ok(_run("visualize", *args, "--out", out))
    assert stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """configs/tiny.py on tiny_run's corpus (so the same tokenizer) from another seed, 2 steps
    with a checkpoint after each: a second run to compare with. Its one warmup step trains at
    learning rate 0, so checkpoint 1 holds the initialisation it started from."""
    import jax

    from guided_jax.config import load_config
    from guided_jax.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("seed_run")
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(root / "corpus.txt"))
    assert config.train.warmup_steps == 1 and config.train.seed != 1
    config.train.update(seed=1, steps=2, checkpoint_every=1, log_every=1, eval_every=2)
    train_and_evaluate(config, root / "seed1", devices=jax.devices()[:1])
    return root / "seed1"


def test_probe_prints_tables_and_a_comparison_and_writes_json(tiny_run, seed_run, tmp_path):
    from guided_jax import weights
    from guided_jax.analysis import anaphora, probe

    report = tmp_path / "probe.json"
    args = ("--workdir", tiny_run, "--compare", seed_run, "--count", 16, "--json", report)
    result = _run("probe", *args)
    stdout = _ok(result)
    name, other = f"{tiny_run.name}@6", "seed1@2"
    assert stdout.startswith(f"{name}: reflexive -> antecedent, top attention, 16 sentences (%)")
    assert f"\n{other}: reflexive -> antecedent, top attention, 16 sentences (%)" in stdout
    assert f"comparison (%): A = {name}, B = {other}" in stdout
    payload = json.loads(report.read_text())
    assert (payload["probe"]["name"], payload["compare"]["name"]) == (name, other)
    # Each side holds its own run's numbers: the probe of that run alone, here in-process.
    examples = anaphora.generate(16, seed=0, variant="both")
    accuracy = {}
    for side, workdir in (("probe", tiny_run), ("compare", seed_run)):
        loaded = weights.load(workdir)
        alone = probe.probe(loaded.model, loaded.tokenizer, examples).accuracy
        np.testing.assert_allclose(payload[side]["accuracy"], alone, atol=1e-6, err_msg=side)
        accuracy[side] = alone
    assert not np.array_equal(accuracy["probe"], accuracy["compare"])  # a swap would show
    # the comparison's last row: best head and mean of A and of B, and B - A (percent)
    last = stdout.strip().splitlines()[-1].split()
    assert last[0] == "all"
    a, b = accuracy["probe"], accuracy["compare"]
    want = [a.max(), b.max(), b.max() - a.max(), a.mean(), b.mean(), b.mean() - a.mean()]
    np.testing.assert_allclose([float(x) for x in last[1:]], 100 * np.array(want), atol=0.051)
    assert _library_log_lines(result) == []
    # The reference's protocol on a file in its format: lines 2 and 4 are not one token per
    # word with the tiny tokenizer, line 5's first word splits after the clause.
    sentences = tmp_path / "reflexive.txt"
    words = ["a cat sees her", "the girl would kick herself", "her friend calls her",
             "my teacher likes her", "he dog finds her", "a dog finds her"]  # fmt: skip
    sentences.write_text("".join(f"{w}\t{len(w.split()) - 1}\t0 1\t\n" for w in words))
    args = ("--workdir", tiny_run, "--compare", seed_run, "--protocol", "reference")
    stdout = _ok(_run("probe", *args, "--sentences", sentences))
    lines = stdout.strip().splitlines()
    assert lines[0] == f"{name}: reflexive -> antecedent, top attention, 3 sentences (%)"
    assert lines[1].split() == ["layer", "h0", "h1", "h2", "h3", "max", "mean"]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    assert f"{other}: reflexive -> antecedent, top attention, 3 sentences (%)" in lines
    assert f"comparison (%): A = {name}, B = {other}" in lines
    assert lines[-2].startswith("not scored") and lines[-2].endswith("clause: line 5")
    assert lines[-1] == "kept=3 of 6 sentences"


def _library_log_lines(result: subprocess.CompletedProcess) -> list[str]:
    """absl/orbax log lines (``I1130 12:00:00.123 ...``, ``WARNING:absl:...``) on the screen."""
    return [
        line
        for line in result.stderr.splitlines()
        if re.match(r"[IWE]\d{4} ", line) or line.startswith(("INFO:", "WARNING:absl"))
    ]


def test_hf_interop_exports_the_keys_and_tensors_that_transformers_saves(tiny_run, tmp_path):
    """transformers is not installed here: the export is held against tests/fixtures/hf/roberta,
    a RobertaForMaskedLM that transformers saved with the sizes of configs/tiny.py but its
    vocabulary and positions (every config key it writes but bookkeeping and defaults, the
    safetensors format tag it requires, every tensor name, shape and dtype)."""
    out = tmp_path / "exported"
    stdout = _ok(_run("hf_interop", "--workdir", tiny_run, "--out", out))
    assert stdout.strip() == f"exported step 6 of {tiny_run} to {out} (RobertaForMaskedLM)"
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    vocab = len(json.loads((out / "vocab.json").read_text()))
    run_model = json.loads((tiny_run / "config.json").read_text())["model"]
    positions = run_model["max_position_embeddings"]
    saved = json.loads((HF_ROBERTA / "config.json").read_text())
    bookkeeping = {"transformers_version", "dtype", "use_cache", "classifier_dropout"}
    want = {key: value for key, value in saved.items() if key not in bookkeeping}
    want.update(vocab_size=vocab, max_position_embeddings=positions)
    assert {key: config.get(key) for key in want} == want
    sizes = {saved["vocab_size"]: vocab, saved["max_position_embeddings"]: positions}
    with safetensors.safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata().get("format") == "pt"
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    expected = safetensors.numpy.load_file(str(HF_ROBERTA / "model.safetensors"))
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype, key
        assert tensors[key].shape == tuple(sizes.get(d, d) for d in value.shape), key


def test_hf_interop_step_0_exports_the_initialisation_the_run_started_from(seed_run, tmp_path):
    """``--step 0`` is the seeded initialisation (the help of visualize and weights.load): the
    weights the run's checkpoint 1 still holds (its first step trains at learning rate 0), not
    the newest checkpoint, and not another seed's initialisation."""
    import jax

    from guided_jax import weights
    from guided_jax.model import model_params
    from guided_jax.weights.workdir import load_params

    out = tmp_path / "init"
    stdout = _ok(_run("hf_interop", "--workdir", seed_run, "--step", 0, "--out", out))
    assert stdout.strip() == f"exported step 0 of {seed_run} to {out} (RobertaForMaskedLM)"
    with safetensors.safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata()["guided_jax_step"] == "0"
    (_, first), (_, newest) = load_params(seed_run, 1), load_params(seed_run, 2)

    def gap(a, b) -> float:
        return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))

    # The run drew its init in one compiled program, step 0 redraws it op by op: the normal
    # samples may differ in their last bit (7e-9 seen), far below one training step's change.
    assert gap(model_params(weights.load(out).model), first) < 1e-7
    assert gap(newest, first) > 1e-4  # the second step moved the weights


def test_finetune_on_a_table_is_quiet_and_writes_results(tiny_run, tmp_path):
    train_csv = write_keyword_csv(tmp_path / "train.csv", 48, seed=0)
    eval_csv = write_keyword_csv(tmp_path / "eval.csv", 16, seed=1)
    args = (
        "--config", "configs/finetune.py", "--pretrained", tiny_run, "--workdir", tmp_path / "ft",
        f"--config.data.train_file={train_csv}", f"--config.data.eval_file={eval_csv}",
        "--config.seeds=1", "--config.epochs=1", "--config.batch_size=8",
    )  # fmt: skip
    result = _run("finetune", *args)
    stdout = _ok(result)
    assert "seed 1: best step" in stdout and "wrote" in stdout
    assert _library_log_lines(result) == []
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["sizes"]["eval"] == 16 and len(results["runs"]) == 1
    missing = tmp_path / "missing.csv"
    result = _run("finetune", *args, f"--config.data.train_file={missing}")
    _one_line_error(result, "finetune", "missing.csv")


def test_diagnostics_draws_the_heads_of_a_run_trained_with_them(tiny_run, tmp_path):
    out = tmp_path / "heads.png"
    stdout = _ok(_run("diagnostics", "--workdir", tiny_run, "--panels", 2, "--out", out))
    assert stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:4] == b"\x89PNG"
    _one_line_error(_run("diagnostics", "--workdir", tmp_path), "diagnostics", "metrics.jsonl")


@pytest.mark.slow
def test_benchmark_times_every_arm_and_appends_a_row(tmp_path, corpus_file):
    results = tmp_path / "RESULTS.md"
    args = ("--config", "configs/benchmark.py:tiny", "--steps", 1, "--warmup", 0, "--rounds", 1)
    corpus = f"--config.data.train_files={corpus_file}"  # not the embedded corpus: seconds
    stdout = _ok(_run("benchmark", *args, corpus, "--nohf", "--results", results))
    for pattern in (
        r"ours: step +[\d.]+ ms +\d+ tokens/s",
        r"ours_guided: step +[\d.]+ ms",
        r"input pipeline: \d+ examples/s",
        r"head diagnostics: [\d.]+ ms per log step",
    ):
        assert re.search(pattern, stdout), pattern
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"guidance_overhead=\d+\.\d+x", last), last
    assert "hf_flax: not measured: --nohf" in stdout
    assert f"results: row R1 of {results}" in stdout
    row = results.read_text().splitlines()[-1]
    assert row.startswith("| R1 | ") and row.endswith(" | current |")
    assert "| benchmark.py:tiny | 4x32 |" in row
    result = _run("benchmark", *args[:2], "--steps", 0)
    assert result.returncode == 2 and "--steps" in result.stderr
