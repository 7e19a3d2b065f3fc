"""The pieces of ``bench.write_tail`` (the command and its stack live there): the open-loop
write generator, the probes sampled during a phase, running a phase, and what is printed."""
