"""lm-evaluation-harness tasks for C-Eval / CMMLU folders on disk (`eval_ceval.py --harness lm_eval`).

- `_minimind_choice.yaml`: the shared task settings (multiple choice over A/B/C/D, our prompt).
- `local_choice.py`: what those settings point at (the dataset loader, the few-shot sampler); lm-eval imports it
  by file path.
- `harness.py`: writes one task per subject of the local folder plus a group, runs lm-eval's `hf` model on an
  exported transformers folder, and turns its samples into eval_ceval's summary rows and predictions.
"""
