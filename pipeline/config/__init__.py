"""Typed configuration: one module per params.yaml section, validated where it is defined.

Deliberately empty: importing pipeline.config.cache must not import the other sections, so that each stage's DVC
dependencies are its own sections' modules (base.py: the shared machinery; params.py: the whole file).
"""
