"""Trainers: the Large User Model (``trainers.lum``) and the incremental DLRM (``trainers.dlrm``).

Trainers import ``schemas`` only, never ``streaming``; Kafka access is a thin adapter inside each trainer.
"""
