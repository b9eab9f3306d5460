"""Test helpers that ship with raftkv: local clusters, histories, the linearizability checker."""
