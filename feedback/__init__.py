"""Feedback: the store of turns and votes, and the settings every layer shares."""
