"""Security suite: hostile volunteers in real end-to-end runs, hostile download servers,
HTTP API fuzzing. Outcomes measured here fill SECURITY.md's table."""
