r"""Train-step speed: our model without and with guidance against HF's FlaxRobertaForMaskedLM.

    python -m guided_jax.benchmark --config configs/benchmark.py
    python -m guided_jax.benchmark --config configs/benchmark.py:roberta_12 \
        --config.model.attention=flash --results benchmarks/RESULTS.md

The last line holds the ratios the project is judged by, e.g. ``guidance_overhead=1.012x
speedup_vs_hf_flax=1.41x``. Only parses flags; the work happens in
:func:`guided_jax.analysis.benchmark.benchmark`.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Benchmark shapes (configs/benchmark.py[:roberta_12])."
)
_STEPS = flags.DEFINE_integer(
    "steps", 12, "Timed steps per arm (medians are reported).", lower_bound=1
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per arm after compiling.", lower_bound=0)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Interleaved rounds the timed steps are split into.", lower_bound=1
)
_HF = flags.DEFINE_bool("hf", True, "Also time HF's FlaxRobertaForMaskedLM (needs transformers).")
_RESULTS = flags.DEFINE_string(
    "results", "", "Markdown file to append the results row to (e.g. benchmarks/RESULTS.md)."
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis import benchmark
    from guided_jax.storage import check_location

    with cli.command("benchmark", argv):
        if _RESULTS.value:  # before minutes of timing
            check_location(_RESULTS.value, "--results")
        results = benchmark.benchmark(
            _CONFIG.value,
            steps=_STEPS.value,
            warmup=_WARMUP.value,
            rounds=_ROUNDS.value,
            hf=_HF.value,
        )
    lines = benchmark.report(results)
    if _RESULTS.value:
        shape = Path(flags.FLAGS["config"].config_filename).name
        row = benchmark.results_row(results, shape)
        name = benchmark.append_results(_RESULTS.value, row)
        lines.insert(-1, f"results: row {name} of {_RESULTS.value}")
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main)
