"""Pretraining, in the order data flows: build (every piece from the config) -> engine (DeepSpeed, the step) ->
objective (the MIM loss) -> loop (steps, health, val) -> checkpoint / preemption / watchdog -> metrics."""
