"""llm-streams: a Kafka stream processor that puts LLMs behind event-driven pipelines."""
