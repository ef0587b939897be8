"""Engine: aggregated streams, projector, subscriptions, runners, executor."""
