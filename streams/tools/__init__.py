"""Tools: the command line (worker, batch, dlq inspect/replay, mock-llm)."""
