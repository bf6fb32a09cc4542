"""The curator: from problems to verified teacher/student pairs (steps 1-5 of SSB)."""
