"""The offline demo: a Q&A task the project writes itself, trained from scratch in about a minute."""
