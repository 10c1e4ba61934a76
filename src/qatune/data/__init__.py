"""Q&A data: readers and layouts -> templates -> tokenization with masking -> batching."""
