"""The pieces of ``bench.latency`` (the command and its run of states live there): the
seeded population, the background jobs, the API's own latency histogram, one state
measured, the services restarted with other settings, and the printed table."""
