"""memento-stream: learn which past case to retrieve, from users' rewards, on Kafka."""

__version__ = "0.1.0"
