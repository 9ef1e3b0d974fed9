"""memfit: fit LLM inference into the memory you have."""
