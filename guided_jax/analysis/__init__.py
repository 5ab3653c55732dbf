"""What is done with trained encoders: fine-tuning (:mod:`.finetune`), the AG-vs-baseline
report (:mod:`.reproduce`), the speed benchmark (:mod:`.benchmark`), attention maps
(:mod:`.attention_maps`), head histories (:mod:`.head_history`), and the coreference probe with
its sentences (:mod:`.probe`, :mod:`.anaphora`, :mod:`.reflexive`). The only layer that imports
matplotlib, scikit-learn, scipy and transformers."""
