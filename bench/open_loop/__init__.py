"""The pieces of ``bench.openloop`` (its public names and the process it runs in live
there): a run's parameters and result, the traffic to send, and the generator."""
