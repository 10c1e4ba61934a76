"""Preference data: (prompt, chosen, rejected) pairs for DPO and reward models.

records.py    layouts (explicit, conversational, implicit HH-RLHF dialogues) and the reader
encode.py     prompt and responses tokenized separately, EOS after each response
truncation.py fitting a pair into max_len (both responses' starts, the prompt's end), counted
pipeline.py   sources -> pairs -> ids -> truncation, with a report (`load_pairs`)
stats.py      what `qatune stats` reports on preference data
"""
