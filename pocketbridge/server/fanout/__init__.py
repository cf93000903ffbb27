"""Fan-out of committed events: the delivery hub and the buses between nodes."""
