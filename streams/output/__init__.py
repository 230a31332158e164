"""Output: the records a request produces (responses, dead letters) and the publisher that writes them."""
