"""What a process needs to run and to survive a stop, shared by pretraining and evaluation: who am I in the job
(ranks, process group), every RNG's state, crash-safe file writes, the safe reader of
`torch.save` zips (allow-listed unpickling), and checkpoints (atomic saves, retention, exact resume).
Imports only eva_train.config / errors; every other folder may import it."""
