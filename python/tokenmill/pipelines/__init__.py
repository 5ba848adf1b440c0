"""Pipelines built on the engine: the batch Inferencer (more to come: RAG, memory models)."""
