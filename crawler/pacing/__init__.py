"""Pacing: the rate gate per key, the slow-down after 429s, the credit budget, retries."""
