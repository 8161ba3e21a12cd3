"""Solvers over masked models. The BiP solver and the OMP / IMP / HYDRA baselines build on training.py."""
