"""Rollout workers: the SGLang-protocol client, server launching, the CPU reference server, tasks."""
