"""Hand-written Triton kernels for the packed BERT encoder and the ColBERT head."""
