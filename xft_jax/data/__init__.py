"""Data: canonical records, source adapters, targets, tokenised batches."""
