"""The pipeline stages behind the CLI: plain functions around Lightning Trainers.

Each stage reads and writes documented files (a trajectory store, a synthetic set),
so it can be run, resumed or replaced on its own.
"""
