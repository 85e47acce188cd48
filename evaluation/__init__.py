"""``memento eval``: policies replayed over a data stream in time order, in-process."""
