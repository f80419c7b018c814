"""The NTM paper's algorithmic tasks (Graves et al. 2014): copy, repeat copy, associative recall,
priority sort. Bits are fair coin flips; extra input channels carry delimiters and scalars."""

import torch

from sparsemem.tasks.base import Batch, Task, random_bits


class Copy(Task):
    """See `level` vectors of `bits`, then a delimiter; output the same vectors.

    input [B, 2L+1, bits+1] (channel `bits`: the delimiter), output [B, 2L+1, bits]; level = L.
    """

    name = "copy"

    def __init__(self, bits: int = 8, min_length: int = 1, max_length: int = 5) -> None:
        super().__init__(min_length, max_length)
        self.bits = bits
        self.input_size = bits + 1
        self.output_size = bits

    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        self._check_level(level)
        B, L, bits = batch_size, level, self.bits
        sequence = random_bits(B, L, bits, generator)
        inputs = torch.zeros(B, 2 * L + 1, bits + 1)
        inputs[:, :L, :bits] = sequence
        inputs[:, L, bits] = 1
        targets = torch.zeros(B, 2 * L + 1, bits)
        targets[:, L + 1 :] = sequence
        mask = torch.zeros(B, 2 * L + 1, dtype=torch.bool)
        mask[:, L + 1 :] = True
        return Batch(inputs, targets, mask)


class RepeatCopy(Task):
    """See `level` vectors, then a delimiter with the repeat count n / max_repeats on its own
    channel; output the sequence n times, then an end marker (output channel `bits`).

    n is drawn uniformly in [1, max_repeats] per batch (repeats_follow_level: in [1, min(L,
    max_repeats)], so a curriculum over lengths raises the repeats with them; the count is still
    scaled by max_repeats, so the input means the same at every level). input [B, T, bits+2],
    output [B, T, bits+1], T = L + 1 + n L + 1; level = L.
    """

    name = "repeat-copy"

    def __init__(
        self,
        bits: int = 8,
        min_length: int = 1,
        max_length: int = 5,
        max_repeats: int = 3,
        repeats_follow_level: bool = False,
    ) -> None:
        super().__init__(min_length, max_length)
        if not isinstance(max_repeats, int) or max_repeats < 1:
            raise ValueError(f"max_repeats must be a positive int; got {max_repeats!r}")
        self.bits = bits
        self.max_repeats = max_repeats
        self.repeats_follow_level = repeats_follow_level
        self.input_size = bits + 2
        self.output_size = bits + 1

    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        self._check_level(level)
        B, L, bits = batch_size, level, self.bits
        most = min(L, self.max_repeats) if self.repeats_follow_level else self.max_repeats
        repeats = int(torch.randint(1, most + 1, (), generator=generator))
        sequence = random_bits(B, L, bits, generator)
        T = L + 1 + repeats * L + 1
        inputs = torch.zeros(B, T, bits + 2)
        inputs[:, :L, :bits] = sequence
        inputs[:, L, bits] = 1
        inputs[:, L, bits + 1] = repeats / self.max_repeats
        targets = torch.zeros(B, T, bits + 1)
        targets[:, L + 1 : T - 1, :bits] = sequence.repeat(1, repeats, 1)
        targets[:, T - 1, bits] = 1
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, L + 1 :] = True
        return Batch(inputs, targets, mask)


class AssociativeRecall(Task):
    """See `level` items of item_length vectors, each after a delimiter (channel `bits`); then a
    query item between two query delimiters (channel bits+1); output the item that followed it.

    input [B, T, bits+2], output [B, T, bits], T = level (item_length+1) + 2 item_length + 2;
    level = the number of items (>= 2).
    """

    name = "associative-recall"

    def __init__(self, bits: int = 8, min_items: int = 2, max_items: int = 6, item_length: int = 3) -> None:
        if min_items < 2:
            raise ValueError(f"associative recall needs min_items >= 2 (a query and its successor); got {min_items}")
        super().__init__(min_items, max_items)
        self.bits = bits
        self.item_length = item_length
        self.input_size = bits + 2
        self.output_size = bits

    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        self._check_level(level)
        B, items, size, bits = batch_size, level, self.item_length, self.bits
        stored = random_bits(B, items * size, bits, generator).view(B, items, size, bits)
        query = torch.randint(0, items - 1, (B,), generator=generator)
        rows = torch.arange(B)
        T = items * (size + 1) + 2 * size + 2
        inputs = torch.zeros(B, T, bits + 2)
        for i in range(items):
            start = i * (size + 1)
            inputs[:, start, bits] = 1
            inputs[:, start + 1 : start + 1 + size, :bits] = stored[:, i]
        start = items * (size + 1)
        inputs[:, start, bits + 1] = 1
        inputs[:, start + 1 : start + 1 + size, :bits] = stored[rows, query]
        inputs[:, start + 1 + size, bits + 1] = 1
        answer = start + size + 2
        targets = torch.zeros(B, T, bits)
        targets[:, answer:] = stored[rows, query + 1]
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, answer:] = True
        return Batch(inputs, targets, mask)


class PrioritySort(Task):
    """See `level` vectors, each with a priority in [-1, 1] (channel `bits`), then a delimiter
    (channel bits+1); output the vectors from the highest priority down: the first `outputs` of
    them (the NTM paper sorts 20 and outputs 16), or all L when outputs is None or above L.

    input [B, L+1+O, bits+2], output [B, L+1+O, bits], O = min(L, outputs); level = L.
    """

    name = "priority-sort"

    def __init__(self, bits: int = 8, min_length: int = 1, max_length: int = 5, outputs: int | None = None) -> None:
        super().__init__(min_length, max_length)
        if outputs is not None and (not isinstance(outputs, int) or outputs < 1):
            raise ValueError(f"outputs must be a positive int or None (all); got {outputs!r}")
        self.bits = bits
        self.outputs = outputs
        self.input_size = bits + 2
        self.output_size = bits

    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        self._check_level(level)
        B, L, bits = batch_size, level, self.bits
        O = L if self.outputs is None else min(L, self.outputs)
        sequence = random_bits(B, L, bits, generator)
        priority = torch.rand(B, L, generator=generator) * 2 - 1
        order = priority.argsort(dim=1, descending=True)[:, :O]
        inputs = torch.zeros(B, L + 1 + O, bits + 2)
        inputs[:, :L, :bits] = sequence
        inputs[:, :L, bits] = priority
        inputs[:, L, bits + 1] = 1
        targets = torch.zeros(B, L + 1 + O, bits)
        targets[:, L + 1 :] = sequence.gather(1, order.unsqueeze(-1).expand(B, O, bits))
        mask = torch.zeros(B, L + 1 + O, dtype=torch.bool)
        mask[:, L + 1 :] = True
        return Batch(inputs, targets, mask)


class KeyValueRecall(Task):
    """Associative recall that needs a large memory: `level` key-value pairs in one long episode,
    then queries about any of them (e.g. 20,000 pairs: more than 1024 slots can hold).

    A store step shows a random key (key_bits) and value (bits) with the store flag (channel
    key_bits + bits). After every `query_every` stores a query step (flag on the last channel)
    shows the key of one of the last `recent` pairs: answering those teaches writing and
    reading within a truncated-BPTT window. The episode ends with `final_queries` queries
    about pairs drawn uniformly from the whole episode, which only a memory that kept every
    pair answers. The value is due at the query step itself. input [B, T, key_bits + bits + 2],
    output [B, T, bits], T = level + level // query_every + final_queries; level = pairs.
    Keys are drawn independently: with key_bits = 32, two equal keys among 20,000 are rare.
    """

    name = "key-value-recall"

    def __init__(
        self,
        bits: int = 8,
        min_pairs: int = 2,
        max_pairs: int = 64,
        key_bits: int = 32,
        query_every: int = 4,
        recent: int = 16,
        final_queries: int = 16,
    ) -> None:
        super().__init__(min_pairs, max_pairs)
        for name, value in (("key_bits", key_bits), ("query_every", query_every), ("recent", recent)):
            if value < 1:
                raise ValueError(f"{name} must be positive; got {value}")
        if final_queries < 0:
            raise ValueError(f"final_queries must be >= 0; got {final_queries}")
        self.bits, self.key_bits = bits, key_bits
        self.query_every, self.recent, self.final_queries = query_every, recent, final_queries
        self.input_size = key_bits + bits + 2
        self.output_size = bits

    def eval_levels(self) -> list[int]:
        return sorted({self.min_level, self.max_level})

    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        self._check_level(level)
        B, P, every = batch_size, level, self.query_every
        keys = random_bits(B, P, self.key_bits, generator)
        values = random_bits(B, P, self.bits, generator)
        stores = torch.arange(P)
        # query j (1-based) follows store j*every - 1 and asks about one of the `recent` before it
        ends = torch.arange(1, P // every + 1) * every
        back = (torch.rand(B, len(ends), generator=generator) * ends.clamp(max=self.recent)).long()
        asked = torch.cat([ends - 1 - back, torch.randint(0, P, (B, self.final_queries), generator=generator)], 1)
        T = P + len(ends) + self.final_queries
        query_steps = torch.cat([ends + torch.arange(len(ends)), torch.arange(T - self.final_queries, T)])
        rows = torch.arange(B).unsqueeze(1)
        inputs = torch.zeros(B, T, self.input_size)
        store_steps = stores + stores // every
        inputs[:, store_steps, : self.key_bits] = keys
        inputs[:, store_steps, self.key_bits : -2] = values
        inputs[:, store_steps, -2] = 1
        inputs[:, query_steps, : self.key_bits] = keys[rows, asked]
        inputs[:, query_steps, -1] = 1
        targets = torch.zeros(B, T, self.bits)
        targets[:, query_steps] = values[rows, asked]
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, query_steps] = True
        return Batch(inputs, targets, mask)
