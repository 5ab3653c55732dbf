"""Pretraining: a run's prepared inputs (:mod:`.inputs`), the MLM objective (:mod:`.masking`,
:mod:`.objective`), the optimizer (:mod:`.optimizer`), the compiled step and program
(:mod:`.step`), the loop (:mod:`.loop`: ``train_and_evaluate``), checkpoints
(:mod:`.checkpoints`) and metrics (:mod:`.metrics`).

Nothing is imported here, so reading a run's metrics does not load the training stack."""
