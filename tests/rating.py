"""A rater for the loop tests (imported by `persona simulate --rater tests.rating:fewer_characters`)."""


def fewer_characters(prompt: str, answer_a: str, answer_b: str) -> str:
    """A taste a random model does not have: the shorter text wins."""
    if len(answer_a) == len(answer_b):
        return "tie"
    return "a" if len(answer_a) < len(answer_b) else "b"
