"""Selection: the budget (:mod:`.budget`), the decision (:mod:`.decide`), its reasons in words
(:mod:`.reasons`), the O(log N) search (:mod:`.bisect`), the fidelity floors (:mod:`.fidelity`)."""
