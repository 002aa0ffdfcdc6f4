"""Checkpoint loading, tokenization, the packed BERT encoder and the ColBERT API."""
