"""Tensor parallelism: process groups, sharding rules, parallel layers, collectives."""
