"""Held-out splits of a document source."""

from jetnemo_jax.data.splits import split_documents


def test_document_split_is_disjoint_fixed_and_lazy():
    reads = []

    class Source:
        def __len__(self):
            return 20

        def __getitem__(self, i):
            reads.append(i)
            return f"doc {i}"

    train, held = split_documents(Source(), 0.2, seed=3)
    assert not reads and len(train) == 16 and len(held) == 4
    docs = {train[i] for i in range(16)} | {held[i] for i in range(4)}
    assert docs == {f"doc {i}" for i in range(20)}
    assert [held[i] for i in range(4)] == [split_documents(Source(), 0.2, seed=3)[1][i] for i in range(4)]
