"""Output: the records a request produces and the publisher that writes them to Kafka."""
