"""Q&A data: readers and layouts -> templates -> tokenization with masking -> batching, and the
batch planner (`plan.py`) that deals every optimizer step's micro-batches out to the ranks."""
