"""qatune: instruction-tune GPT-2 on question–answer data, and understand the run."""

__version__ = "0.1.0"
