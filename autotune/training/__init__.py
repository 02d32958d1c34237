"""Recipe -> model and optimizer, the step loop and its measurements.

Shared by the probe's child process and `autotune train`; never imports the study.
"""
