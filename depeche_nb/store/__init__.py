"""Message store: typed messages, serializers, reads and writes."""
