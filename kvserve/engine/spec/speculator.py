"""Which sequences speculate this step, with how many tokens, and the counters /metrics reads."""
from dataclasses import dataclass, field

from kvserve.engine.request import SequenceStatus

METHODS = ("ngram", "self", "draft")

# Above this many sequences (running or waiting) nobody speculates: the k extra rows per sequence then cost
# more than the tokens they save. Step time of the C step + logits (SmolLM2-135M int4, 1 thread,
# 512-token contexts; issue 27, 2026-12-06, AVX2, after verification rows moved to qmatmul.c's
# few-rows kernel) for B decodes vs B x (1 + 4) rows: B=1: 2.58x, B=2: 2.10x, B=4: 2.26x, B=8: 2.54x,
# B=16: 2.70x. Input-grounded requests reach ~4 tokens per verification, which pays at every B
# measured; the batch workload of `bench latency` (300-token texts) reaches 2.1 (acceptance 0.57),
# its break-even from B=2 on, and gains 1.07x at 64 streams with speculation below 8.
MAX_BATCH = 8
# per request: acceptance (accepted / proposed) as an exponential moving average; after
# MIN_ROUNDS verifications below LOW_ACCEPTANCE it pauses, for PAUSE steps, doubling each time
# (at k = 4, 0.3 is ~2.2 tokens per verification: the break-even of a single stream above)
# A request starts at EMA_START, so a first verification that accepts nothing pauses it.
EMA_WEIGHT = 0.3
EMA_START = 0.4
MIN_ROUNDS = 1
LOW_ACCEPTANCE = 0.3
# Below this EMA a request drafts one token only: two rows cost ~1.3x one at B=1, five 2.2x, so a
# request proves itself cheaply before it drafts k (two fully accepted drafts lift 0.4 to 0.71).
# A proposer with `full_drafts` (self) drafts k from the start: its case is a long context, where
# the verification's rows share the reads of the KV cache that make a step expensive.
TRUSTED = 0.6
PAUSE = 16
# A proposer with `free_drafts` (ngram: a lookup) doubles a request's k after a verification that
# accepts its whole draft, up to GROW x k, and goes back to k after one that does not: an input-
# grounded run copies long spans, and on the C step 9 rows cost ~1.4x 5 (issue 27, SmolLM2, 1k
# context) where 5 rows cost ~2.6x one.
GROW = 2


@dataclass
class SpecState:
    """Per sequence."""
    ema: float = EMA_START
    rounds: int = 0
    paused_until: int = 0
    pause: int = PAUSE
    k: int = 0  # its current draft length when trusted (0: the speculator's k)
    ngrams: object = None  # its NgramIndex
    draft: object = None  # its state in the draft model's cache


@dataclass
class SpecStats:
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # of which the target kept
    rounds: int = 0  # verifications (sequence steps with a draft)
    emitted: int = 0  # tokens those steps produced: accepted + one of the target's

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step (1 would be plain decoding)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "rounds": self.rounds,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length}


@dataclass
class Speculator:
    proposer: object  # propose(seqs, ks) -> a draft per sequence (at most k tokens each)
    k: int
    max_model_len: int
    max_batch: int = MAX_BATCH
    stats: SpecStats = field(default_factory=SpecStats)
    steps: int = 0

    def propose(self, running: list, waiting: int = 0) -> None:
        """Sets draft_token_ids of the running decodes that speculate this step (others: []).
        waiting: requests not yet admitted. Past max_batch sequences in all (decoding, prefilling or
        waiting) nobody speculates: draft rows would take the step's token budget from prompts."""
        self.steps += 1
        # decodes past their first token (the prompt's last token samples alone: n > 1 forks there)
        decodes = [s for s in running if s.status is SequenceStatus.RUNNING and s.num_uncomputed == 1
                   and len(s.token_ids) > s.num_prompt_tokens]
        for s in decodes:
            s.draft_token_ids = []
        if len(running) + waiting > self.max_batch:
            return
        seqs, ks = [], []
        for s in decodes:
            k = self._room(s)
            if k > 0:
                seqs.append(s)
                ks.append(k)
        if seqs:
            for s, draft in zip(seqs, self.proposer.propose(seqs, ks)):
                s.draft_token_ids = draft

    def prompts_done(self, sampled: list) -> None:
        """After a step: the sequences that sampled their first token in it get their prompts run
        by a proposer with its own cache (a draft model), in the step that ends the target's prefill."""
        catch_up = getattr(self.proposer, "catch_up", None)
        if catch_up is None:
            return
        seqs = [s for s in sampled if len(s.token_ids) == s.num_prompt_tokens + 1 and not s.finished
                and self._speculates(s)]
        if seqs:
            catch_up(seqs)

    @staticmethod
    def _speculates(seq) -> bool:
        p = seq.params
        return p.speculative and p.structured is None and seq.policy.is_full

    def _room(self, seq) -> int:
        """Draft tokens worth proposing: 0 for requests that do not speculate."""
        if not self._speculates(seq):
            return 0
        p = seq.params
        if seq.spec is None:
            seq.spec = SpecState()
        if seq.spec.paused_until > self.steps:
            return 0
        trusted = seq.spec.ema >= TRUSTED or getattr(self.proposer, "full_drafts", False)
        k = min((seq.spec.k or self.k) if trusted else 1, self.max_model_len - len(seq.token_ids))
        if p.max_tokens is not None:  # the target adds one token of its own
            k = min(k, p.max_tokens - (len(seq.token_ids) - seq.num_prompt_tokens) - 1)
        return k

    def record(self, seq, proposed: int, accepted: int, emitted: int) -> None:
        st, spec = self.stats, seq.spec
        st.proposed += proposed
        st.accepted += accepted
        st.rounds += 1
        st.emitted += emitted
        spec.rounds += 1
        spec.ema += EMA_WEIGHT * (accepted / proposed - spec.ema)
        if getattr(self.proposer, "free_drafts", False):
            whole = accepted == proposed and proposed >= (spec.k or self.k)
            spec.k = min(GROW * self.k, 2 * (spec.k or self.k)) if whole else self.k
        if spec.rounds >= MIN_ROUNDS and spec.ema < LOW_ACCEPTANCE:
            spec.paused_until = self.steps + spec.pause
            spec.pause *= 2
            spec.rounds, spec.ema = 0, EMA_START
