"""Chunkings of a stream shared by the streaming tests."""
import random

PRIMES = (2, 3, 5, 7, 11, 13, 17)


def chunk_lengths(kind: str, total: int, receptive_field: int, seed: int = 0):
    """Chunk lengths summing to ``total``: all ones, primes in turn, longer than the receptive field,
    or a random mix of the three within one stream."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        if kind == "ones":
            h = 1
        elif kind == "primes":
            h = PRIMES[len(lengths) % len(PRIMES)]
        elif kind == "long":
            h = receptive_field + 17 + len(lengths)
        else:
            h = rng.choice([1, rng.choice(PRIMES), receptive_field + rng.randrange(1, 40)])
        lengths.append(min(h, total - sum(lengths)))
    return lengths
