"""Kernel calls the standard library lacks, through ctypes: one small module per facility."""
