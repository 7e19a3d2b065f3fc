"""Kafka ingestion of merchant audiences (the data-engineering "actor")."""
