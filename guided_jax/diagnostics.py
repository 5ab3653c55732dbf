"""Heat maps of the head diagnostics over a run (``train.diagnostics=true``): per layer and
head, the attention mass on the target (or closest built-in pattern) and the entropy.

    python -m guided_jax.diagnostics --workdir runs/x   # writes runs/x/heads.png

Only parses flags; the work happens in :func:`guided_jax.analysis.head_history.plot_history`.
"""

from __future__ import annotations

from absl import flags

from guided_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir trained with diagnostics.")
_OUT = flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/heads.png).")
_PANELS = flags.DEFINE_integer("panels", 6, "How many logged steps to draw.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis.head_history import plot_history
    from guided_jax.storage import as_path
    from guided_jax.train.metrics import has_metrics, read_metrics

    workdir = as_path(_WORKDIR.value)
    with cli.command("diagnostics", argv):
        if not has_metrics(workdir):
            raise FileNotFoundError(f"{str(workdir / 'metrics.jsonl')!r} does not exist")
        out = _OUT.value or workdir / "heads.png"
        path = plot_history(read_metrics(workdir), out, panels=_PANELS.value, title=workdir.name)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
