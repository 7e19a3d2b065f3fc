"""The pieces of ``bench.scale`` (the command and its whole run live there): loading the
population, the rebuild and its memory, the version scan, PostgreSQL's sizes, reads
through the API, the month report, and the result table."""
