"""Measuring training speed and memory on the GPU."""
