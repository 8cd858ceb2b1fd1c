"""Meshkeeper: a service mesh for Python services registered in ZooKeeper.

This package is the shared model: registry paths and records, xDS resource names, node
metadata, and the command line. ``controlplane`` and ``sidecar`` import it; it imports neither.
"""

__version__ = "0.1.0"
