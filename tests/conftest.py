"""Test setup: CPU only, 8 fake devices, set before jax is imported anywhere."""

import fcntl
import os
import shutil

os.environ["JAX_PLATFORMS"] = "cpu"
# Test files run in parallel worker processes on two cores: each XLA computation on one thread.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
).strip()

import pathlib

import pytest

# The tests' programs are tiny: XLA's cheapest compilation makes the suite about twice as fast
# (the README's default job, run as a user runs it, keeps XLA's defaults: see user_env).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
# Many tests compile the same tiny programs, also in CLI subprocesses: share XLA's results.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
SHARED_DATA = REPO.parent / "shared" / "data"


def cli_env(devices: int = 1) -> dict[str, str]:
    """Environment for a CLI subprocess on ``devices`` fake CPU devices (the README's laptop
    run has one)."""
    flags = os.environ["XLA_FLAGS"].replace(
        "--xla_force_host_platform_device_count=8",
        f"--xla_force_host_platform_device_count={devices}",
    )
    return {**os.environ, "XLA_FLAGS": flags}


def user_env() -> dict[str, str]:
    """Environment of a user's laptop run: one CPU device, XLA's default optimisation and
    threads (not the tests' settings above)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


@pytest.fixture
def wikitext_valid() -> pathlib.Path:
    """The shared WikiText-2 validation file; tests using it skip where it is absent."""
    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not path.exists():
        pytest.skip(
            f"shared corpus {path.name} not present (expected beside the repo in "
            f"shared/data/wikitext-2)"
        )
    return path


def write_corpus(path: pathlib.Path, lines: int = 300, seed: int = 0) -> pathlib.Path:
    """A small synthetic English-like corpus with learnable structure (no download)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    subjects = ["the cat", "a dog", "my sister", "the old man", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "finds", "follows", "draws", "calls"]
    objects = ["the ball", "a red apple", "the river", "her friend", "the garden", "a letter"]
    endings = [".", "!", " today.", " again.", " at night."]
    rows = []
    for _ in range(lines):
        words = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
            for _ in range(rng.integers(2, 5))
        ]
        rows.append(" ".join(w.capitalize() for w in words))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def corpus_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def tiny_config(corpus_file: pathlib.Path):
    """configs/tiny.py on the synthetic corpus."""
    from guided_jax.config import load_config

    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(corpus_file)
    return config


def shared_by_workers(tmp_path_factory, name: str, build) -> pathlib.Path:
    """``build(directory)``'s result, made once per test session even when test files run in
    several worker processes (the first worker builds it under a lock, the others wait and
    read it): for the session's read-only runs, which cost a training run each."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base directory every worker of this session shares
    directory, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """A finished configs/tiny.py run on one device with head diagnostics (the encoder and
    metrics that analysis tests and commands read; never written to)."""

    def build(root: pathlib.Path) -> None:
        import jax

        from guided_jax.config import load_config
        from guided_jax.train.loop import train_and_evaluate

        config = load_config(str(REPO / "configs" / "tiny.py"))
        config.data.train_files = str(write_corpus(root / "corpus.txt"))
        config.train.diagnostics = True
        train_and_evaluate(config, root / "run", devices=jax.devices()[:1])

    return shared_by_workers(tmp_path_factory, "tiny_run", build) / "run"


def small_model(**changes):
    """The config of a small encoder for tests that build models by hand (2 layers, d=16,
    4 heads, FFN 32, vocabulary 40, 24 positions), with ``changes``."""
    from guided_jax.model import ModelConfig

    sizes = dict(
        vocab_size=40,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        intermediate_size=32,
        max_position_embeddings=24,
    )
    return ModelConfig(**{**sizes, **changes})


KEYWORDS = ["the", "a", "cat", "dog", "sees", "likes", "river", "garden", "ball", "letter"]


def write_keyword_csv(path: pathlib.Path, rows: int, seed: int) -> pathlib.Path:
    """A fine-tuning table: label "yes" when the sentence holds the word "excellent", else "no"
    (half of each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(rows):
        words = list(rng.choice(KEYWORDS, size=rng.integers(4, 9)))
        if i % 2:
            words.insert(int(rng.integers(0, len(words))), "excellent")
        lines.append(f"{' '.join(words)},{'yes' if i % 2 else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- comparing runs

STEPS = 20


def run_config(corpus, *, data=-1, fsdp=1, tensor=1):
    """The tiny config for STEPS steps with every step logged, on the given mesh."""
    from guided_jax.config import load_config

    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(corpus)
    config.train.steps = STEPS
    config.train.log_every = 1
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return config


def final_params(workdir, *, step=STEPS, with_key_bias=False):
    """Parameters of checkpoint ``step``, without the key bias: softmax ignores it (q.b is the
    same for every key of a row), so its gradient is rounding noise that Adam scales up to +-lr
    steps, and any change in summation order (another mesh) changes it."""
    import numpy as np

    from guided_jax.weights.workdir import load_params

    _, params = load_params(workdir, step)
    if with_key_bias:
        return params
    for layer in params["layers"].values():
        bias = layer["attention"]["qkv"]["bias"]
        layer["attention"]["qkv"]["bias"] = np.delete(np.asarray(bias), 1, axis=0)
    return params


def records_without_timing(workdir) -> list[dict]:
    """A run's metrics records without ``tokens_per_sec`` (the one value timing changes)."""
    from guided_jax.train.metrics import read_metrics

    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_metrics(workdir)]


def assert_runs_match(reference, other, rtol=1e-5, step=STEPS):
    """Same logged metrics (but timing) and the same final parameters, to ``rtol``."""
    import jax
    import numpy as np

    from guided_jax.train.metrics import read_metrics

    ref_records, records = read_metrics(reference), read_metrics(other)
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    for ref, rec in zip(ref_records, records, strict=True):
        for key, value in ref.items():
            if key not in ("step", "tokens_per_sec"):
                assert rec[key] == pytest.approx(value, rel=rtol, abs=1e-7), (rec["step"], key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6),
        final_params(reference, step=step),
        final_params(other, step=step),
    )


@pytest.fixture(scope="session")
def run_corpus(tmp_path_factory) -> pathlib.Path:
    """The corpus of the runs compared across meshes and processes."""
    directory = shared_by_workers(
        tmp_path_factory, "run_corpus", lambda root: write_corpus(root / "corpus.txt")
    )
    return directory / "corpus.txt"


@pytest.fixture(scope="session")
def sharded_run(run_corpus, tmp_path_factory) -> pathlib.Path:
    """``run_config`` trained on a data=2, fsdp=2, tensor=2 mesh of 8 devices (never written to)."""

    def build(root: pathlib.Path) -> None:
        from guided_jax.train.loop import train_and_evaluate

        train_and_evaluate(run_config(run_corpus, data=2, fsdp=2, tensor=2), root / "run")

    return shared_by_workers(tmp_path_factory, "sharded_run", build) / "run"


INTERRUPTED_STEPS = 60


def interrupted_run_args(corpus) -> list[str]:
    """The CLI flags of the run that the kill -9 tests interrupt and resume (configs/tiny.py as
    :func:`interrupted_run_config` sets it)."""
    return [
        "--config=configs/tiny.py",
        f"--config.data.train_files={corpus}",
        f"--config.train.steps={INTERRUPTED_STEPS}",
        "--config.train.log_every=1",
        "--config.train.eval_every=30",
        "--config.train.checkpoint_every=20",
    ]


@pytest.fixture(scope="session")
def uninterrupted_run(run_corpus, tmp_path_factory) -> pathlib.Path:
    """The kill -9 tests' run (:func:`interrupted_run_args`) trained without a stop, on one
    device (never written to)."""

    def build(root: pathlib.Path) -> None:
        import jax

        from guided_jax.train.loop import train_and_evaluate

        config = run_config(run_corpus)
        config.train.update(steps=INTERRUPTED_STEPS, checkpoint_every=20, eval_every=30)
        train_and_evaluate(config, root / "run", devices=jax.devices()[:1])

    return shared_by_workers(tmp_path_factory, "uninterrupted_run", build) / "run"


@pytest.fixture(scope="session")
def gcs_root():
    """``gs://`` URL of a bucket in a local Cloud Storage emulator (one per worker process,
    started on first use; see gcs_emulator.py)."""
    import gcs_emulator

    with gcs_emulator.start() as url:
        yield url


@pytest.fixture
def gcs_dir(gcs_root, request) -> str:
    """A ``gs://`` prefix of the emulator's bucket that no other test uses."""
    import uuid

    return f"{gcs_root}/{request.node.name}-{uuid.uuid4().hex[:8]}"
