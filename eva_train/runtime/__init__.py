"""The process's environment: who am I in the job (ranks, process group), every RNG's state, crash-safe file writes.
The lowest layer: everything else may import it, it imports nothing from eva_train."""
