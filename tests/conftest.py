"""Test-session settings: one torch thread (the suite's tensors are small; extra threads only compete with
OpenMM's own and with other processes on a 2-core machine, which slowed training tests many-fold)."""
import torch

torch.set_num_threads(1)
