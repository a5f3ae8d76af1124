"""The data stage: harmful requests, jailbreak wrappers, refusals, general and borderline data, splits."""
