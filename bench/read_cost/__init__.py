"""The pieces of ``bench.read_path`` (the command, its rounds and its report live there):
the shipped configuration, the seeded population, one measured run, and the percentage
segments defined for a round."""
