"""Serving a trained workdir: restoring it, evaluation files and predictions, the
`Predictor`, ensembles and the export to Hugging Face files."""
