"""Every bad input the run must refuse before it writes anything, and corpus selection."""

import pytest

from conftest import write_corpus
from guided_jax.config import ConfigError, check_config
from guided_jax.data.text import CorpusError
from guided_jax.guidance import SpecError
from guided_jax.train.inputs import prepare


def _refused(config, workdir, error, match):
    with pytest.raises(error, match=match):
        prepare(config, workdir)


def test_missing_corpus_file_is_refused_before_writing(tiny_config, tmp_path):
    tiny_config.data.train_files = str(tmp_path / "nope.txt")
    _refused(tiny_config, tmp_path / "run", CorpusError, "nope.txt")
    assert not (tmp_path / "run").exists()


def test_empty_corpus_file_is_refused(tiny_config, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    tiny_config.data.train_files = str(tmp_path / "empty.txt")
    _refused(tiny_config, tmp_path / "run", CorpusError, "empty.txt")
    assert not (tmp_path / "run").exists()


def test_undecodable_corpus_file_is_refused(tiny_config, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    tiny_config.data.train_files = str(tmp_path / "latin1.txt")
    _refused(tiny_config, tmp_path / "run", CorpusError, "latin1.txt")
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_a_block_is_refused(tiny_config, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words\n")
    tiny_config.data.train_files = str(tmp_path / "short.txt")
    tiny_config.data.tokenizer_vocab_size = 300
    _refused(tiny_config, tmp_path / "run", ValueError, "block")
    assert not (tmp_path / "run").exists()


def test_corpus_smaller_than_a_batch_is_refused(tiny_config, tmp_path):
    tiny_config.train.batch_size = 4096
    _refused(tiny_config, tmp_path / "run", ValueError, "batch")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("heads", "match"),
    [
        ("2,2,2,2", "needs 8 heads but the model has 4"),
        ("next:1,diagonal:2", "diagonal"),
        ("0,1,x,1", "'x'"),
    ],
)
def test_bad_head_spec_is_refused(tiny_config, tmp_path, heads, match):
    tiny_config.guidance.heads = heads
    _refused(tiny_config, tmp_path / "run", SpecError, match)
    assert not (tmp_path / "run").exists()


def test_unknown_guidance_token_is_refused(tiny_config, tmp_path):
    tiny_config.guidance.heads = "next:1,token[<sep>]:1"
    _refused(tiny_config, tmp_path / "run", ValueError, "<sep>")
    assert not (tmp_path / "run").exists()


def test_start_layer_out_of_range_is_refused(tiny_config, tmp_path):
    tiny_config.guidance.start_layer = 2
    _refused(tiny_config, tmp_path / "run", SpecError, "start layer 2")


def test_block_size_above_max_positions_is_refused(tiny_config, tmp_path):
    tiny_config.data.block_size = 65
    _refused(tiny_config, tmp_path / "run", ConfigError, "max_position_embeddings=66")
    assert not (tmp_path / "run").exists()


def test_bert_blocks_may_fill_every_position(tiny_config, tmp_path):
    tiny_config.model.update(model_type="bert", max_position_embeddings=32)
    tiny_config.data.tokenizer_kind = "wordpiece"
    check_config(tiny_config)  # 32 tokens in 32 positions: no padding offset
    tiny_config.data.block_size = 33
    _refused(
        tiny_config,
        tmp_path / "run",
        ConfigError,
        r"block_size=33 exceeds .* \(32 tokens as BERT numbers positions from 0\)",
    )
    assert not (tmp_path / "run").exists()


def test_model_vocab_smaller_than_tokenizer_is_refused(tiny_config, tmp_path):
    tiny_config.model.vocab_size = 100
    _refused(tiny_config, tmp_path / "run", ConfigError, "vocab_size=100")


def test_workdir_of_another_config_is_refused_and_kept(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    prepare(tiny_config, workdir)
    saved = {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    tiny_config.train.learning_rate = 5e-3
    _refused(tiny_config, workdir, ConfigError, r"train\.learning_rate: 0\.001 -> 0\.005")
    assert {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == saved


def test_globbed_train_files_and_separate_eval_file(tiny_config, tmp_path):
    write_corpus(tmp_path / "part-a.txt", lines=150, seed=1)
    write_corpus(tmp_path / "part-b.txt", lines=150, seed=2)
    write_corpus(tmp_path / "held-out.txt", lines=60, seed=3)
    tiny_config.data.train_files = str(tmp_path / "part-*.txt")
    tiny_config.data.eval_files = str(tmp_path / "held-out.txt")
    inputs = prepare(tiny_config, tmp_path / "run")
    single = prepare(
        _with(tiny_config, train_files=str(tmp_path / "part-a.txt")), tmp_path / "run-a"
    )
    assert len(inputs.train_blocks) > 1.5 * len(single.train_blocks)
    assert len(inputs.eval_blocks) > 0


def test_glob_matching_nothing_is_refused(tiny_config, tmp_path):
    tiny_config.data.train_files = str(tmp_path / "nothing-*.txt")
    _refused(tiny_config, tmp_path / "run", CorpusError, "matches no file")


def _with(config, **data_overrides):
    config = config.copy_and_resolve_references()
    config.data.update(data_overrides)
    return config
