"""`dvlm serve`: an OpenAI-compatible server over an engine that batches requests between blocks."""
