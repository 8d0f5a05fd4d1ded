"""The preload of the "heavy" profile in tests/test_profiles.py."""

import fractions

TABLE = {str(i): fractions.Fraction(i, 7) for i in range(1000)}


def size() -> int:
    return len(TABLE)
