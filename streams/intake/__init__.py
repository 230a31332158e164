"""Intake: records in from Kafka (faust transport, agent, runtime, ack tracker, per-record processor)."""
