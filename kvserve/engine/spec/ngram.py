"""Prompt lookup: the k tokens that followed the latest earlier occurrence of the sequence's last
n tokens (n from max_n down to min_n), in its prompt and output. Input-grounded outputs
(summaries, rewrites, code edits, extraction) copy spans of their input, and those spans come
back whole.

Each sequence keeps an index per n: n-gram -> the position after its latest occurrence, grown by
the tokens added since the last lookup, so a step costs O(new tokens), not O(context)."""


class NgramIndex:
    def __init__(self, min_n: int, max_n: int):
        self.ns = range(max_n, min_n - 1, -1)
        self.last: dict[int, dict[tuple, int]] = {n: {} for n in self.ns}
        self.indexed = 0  # n-grams ending at positions <= indexed are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens)
        # index every n-gram but the suffix itself (it would only find itself)
        for n, table in self.last.items():
            for i in range(max(n, self.indexed + 1), end):
                table[tuple(tokens[i - n:i])] = i
        self.indexed = max(self.indexed, end - 1)
        for n in self.ns:
            if end < n:
                continue
            at = self.last[n].get(tuple(tokens[end - n:]))
            if at is not None:
                out = tokens[at:at + k]
                period = end - at  # the suffix repeats with this period: so does what follows
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []


class NgramProposer:
    free_drafts = True  # see speculator.GROW

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, ks):
            index = seq.spec.ngrams
            if index is None:
                index = seq.spec.ngrams = NgramIndex(self.min_n, self.max_n)
            out.append(index.propose(seq.token_ids, k))
        return out
