"""Parallelisms applied to a model from outside, composed on one DeviceMesh.

FSDP2 / HSDP (`fully_shard`), tensor and sequence parallel (DTensor), pipeline parallel
(`torch.distributed.pipelining`), activation checkpointing and `torch.compile`. Model code never
branches on these; the trainer calls each model's parallelize function with a `ParallelDims`.
"""
