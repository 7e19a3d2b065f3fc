"""The adapter for CP, the downstream targeting service (contract: docs/cp-contract.md).

``client.CpClient`` implements ``CpGateway``; ``emulator`` is an in-memory CP with fault
injection, for tests and local runs.
"""
