"""The parts of training that read alone: checkpoint files and the run's progress (resume, best model,
early stopping), the accumulation of one iteration over shards and ranks, and the metrics log.
The optimisation loop that uses them is :mod:`openmm_snf.train`."""
